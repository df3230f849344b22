"""Guidance benchmark (issue 12): guided samplers against exact conditional distributions on the
oracle, and classifier-free guidance on a class-conditional digits U-Net.

**Oracle** (``oracle``): the labelled mixtures ``ring8c`` (2-D) and ``gmm64c`` (64-D) under the
VP SDE, class ``y = 1`` (two components with unequal weights). At 10, 20 and 50 solver steps,
from the same starting noise (and the same noise at every stochastic step), float64:

- ``sub-mixture``: unguided sampling of the exact sub-mixture ``OracleModel(mix.conditional(y))``,
  the reference every guided sampler should match;
- ``cfg s=1``: ``ClassifierFreeGuidance(mix, 1.0, y=y)`` (at scale 1 the conditional model, one
  evaluation per call);
- ``classifier s=1``: ``ClassifierGuidance(mix, mix, 1.0, y=y)``, the unconditional score plus
  the exact classifier's gradient (two evaluations per call); ``@ same nfe``: the same at half the
  steps, i.e. at the sub-mixture's number of evaluations.

Metrics against 20000 exact samples of ``p(x_0 | y)``: ``weight_tv`` (each sample assigned to its
most responsible component of the *whole* mixture; total variation between the sampled weights and
the sub-mixture's, zero on the other classes, so samples leaking into other classes count),
``off_class`` (share of samples assigned to another class), ``sliced_w`` (sliced Wasserstein,
256 projections) and ``max_dev`` (largest difference to the sub-mixture row's samples from the
same noise). The statistical floor: exact samples of the same size against the same reference
(mean and standard deviation over 5 fresh sets).

**Digits** (``digits --checkpoint PATH``): a class-conditional model (e.g. configs/digits/cond.py,
trained with label dropout), classifier-free guidance at scales ``s`` = 0, 1, 2, 4 (``s = 1 + w``),
plain and limited to a noise interval ``(lo, hi]`` of ``sigma/alpha`` (default 0.28, 5.42: the
interval Kynkäänniemi et al. 2024 report for EDM2), ``--per-class`` samples of every class by
DPM-Solver++(2M) at ``--steps`` steps. Per scale: the digits CNN's accuracy on the requested
class (``sde_diffusion.metrics.digits_classifier``) and the digits Fréchet distance to the test
split, beside the real-data floor (the first ``n`` training images against the test split) and
the run's NFE and network calls. A PNG: one panel per scale and variant, one row per class.

    python benchmarks/guidance.py oracle                      # ~2 min CPU
    python benchmarks/guidance.py digits --checkpoint /work/runs/digits_cond
    python benchmarks/guidance.py oracle --quick --out /tmp/g  # seconds

Writes benchmarks/results/guidance_oracle.{md,csv} and guidance_digits.{md,csv,png} (``--out``:
another prefix instead of benchmarks/results/guidance).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion import VPSDE, ClassifierFreeGuidance, ClassifierGuidance, sample  # noqa: E402
from sde_diffusion.experiments import named_oracle  # noqa: E402
from sde_diffusion.metrics import sliced_wasserstein  # noqa: E402
from sde_diffusion.models import OracleModel  # noqa: E402
from sde_diffusion.reports import write_csv  # noqa: E402
from sde_diffusion._files import write_text  # noqa: E402

CLASS = 1
SOLVERS = ("dpm_solver++", "ddim:eta=1")


def _fmt(v, sd=None) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        text = "0" if v == 0 else f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.1e}"
        return text + (f" ± {sd:.2g}" if sd is not None and math.isfinite(sd) else "")
    return str(v)


def _table(rows: List[dict], columns: Dict[str, str]) -> str:
    """A Markdown table of ``rows`` with ``columns`` {key: header}; ``key_sd`` beside a key gives
    its ± spread."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), r.get(k + "_sd")) for k in columns) + " |")
    return "\n".join(lines) + "\n"


# ---- oracle ---------------------------------------------------------------------------------------
def _weights_error(x: torch.Tensor, mix, y: int) -> Dict[str, float]:
    """``weight_tv`` and ``off_class`` of samples ``x`` against ``p(x_0 | y)`` (see the module
    docstring)."""
    comp = mix.responsibilities(x, None).argmax(1)
    got = torch.bincount(comp, minlength=mix.n_components).double() / x.shape[0]
    members = mix.labels == y
    true = torch.where(members, mix.weights, torch.zeros_like(mix.weights))
    true = true / true.sum()
    return {"weight_tv": float(0.5 * (got - true).abs().sum()),
            "off_class": float(got[~members].sum())}


def _solver(spec: str):
    name, _, opt = spec.partition(":")
    options = {}
    if opt:
        key, value = opt.split("=")
        options[key] = float(value)
    return name, options


def oracle_rows(name: str, n: int, steps: Sequence[int], n_ref: int, floors: int,
                seed: int = 0) -> List[dict]:
    sde = VPSDE()
    mix = named_oracle(name, sde)
    sub = mix.conditional(CLASS)
    gen = torch.Generator().manual_seed(seed + 100)
    ref = sub.sample(n_ref, generator=gen, dtype=torch.float64)
    proj = lambda: torch.Generator().manual_seed(seed + 7)            # noqa: E731
    rows = []
    floor_sw, floor_tv, floor_off = [], [], []
    for _ in range(floors):
        e = sub.sample(n, generator=gen, dtype=torch.float64)
        floor_sw.append(sliced_wasserstein(e, ref, generator=proj()))
        err = _weights_error(e, mix, CLASS)
        floor_tv.append(err["weight_tv"])
        floor_off.append(err["off_class"])
    sd = lambda v: float(torch.tensor(v).std()) if len(v) > 1 else float("nan")  # noqa: E731
    rows.append({"oracle": name, "solver": "exact samples (floor)", "method": "p(x_0|y)",
                 "steps": None, "nfe": 0, "network_calls": 0,
                 "weight_tv": sum(floor_tv) / floors, "weight_tv_sd": sd(floor_tv),
                 "off_class": sum(floor_off) / floors,
                 "sliced_w": sum(floor_sw) / floors, "sliced_w_sd": sd(floor_sw),
                 "max_dev": None, "wall_s": None})
    x_T = sde.prior_sampling((n,) + tuple(mix.event_shape),
                             generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for spec in SOLVERS:
        solver, options = _solver(spec)
        for k in steps:
            models = {
                "sub-mixture": (OracleModel(sub), k),
                "cfg s=1": (ClassifierFreeGuidance(mix, 1.0, y=CLASS), k),
                "classifier s=1": (ClassifierGuidance(OracleModel(mix), mix, 1.0, y=CLASS), k),
                "classifier s=1 @ same nfe": (ClassifierGuidance(OracleModel(mix), mix, 1.0,
                                                                 y=CLASS), max(k // 2, 1)),
            }
            base = None
            for method, (model, k_run) in models.items():
                start = time.perf_counter()
                out = sample(model, x_T=x_T.clone(), solver=solver, steps=k_run,
                             generator=seed + 1, **options)
                wall = time.perf_counter() - start
                x = out.samples
                if base is None:
                    base = x
                row = {"oracle": name, "solver": spec, "method": method, "steps": k_run,
                       "nfe": out.nfe,
                       "network_calls": getattr(model, "network_calls", out.nfe),
                       **_weights_error(x, mix, CLASS),
                       "sliced_w": sliced_wasserstein(x, ref, generator=proj()),
                       "max_dev": float((x - base).abs().max()) if k_run == k else None,
                       "wall_s": wall}
                rows.append(row)
                print(f"  {name} {spec} {method} steps={k_run}: tv {row['weight_tv']:.4f} "
                      f"sw {row['sliced_w']:.4f}", flush=True)
    return rows


ORACLE_COLUMNS = {"oracle": "oracle", "solver": "solver", "steps": "steps", "method": "method",
                  "nfe": "NFE", "network_calls": "calls", "weight_tv": "weight TV",
                  "off_class": "off-class", "sliced_w": "sliced W",
                  "max_dev": "max dev. vs sub-mixture"}
DIGITS_COLUMNS = {"variant": "guidance", "scale_s": "s", "w": "w", "accuracy": "accuracy",
                  "frechet": "Fréchet", "frechet_real_floor": "real-data floor", "nfe": "NFE",
                  "network_calls": "calls"}


def run_oracle(args) -> str:
    n = 1000 if args.quick else args.n
    steps = (10,) if args.quick else (10, 20, 50)
    n_ref = 2000 if args.quick else 20000
    floors = 2 if args.quick else 5
    rows = []
    for name in ("ring8c", "gmm64c"):
        rows += oracle_rows(name, n, steps, n_ref, floors, args.seed)
    out = args.out + "_oracle"
    write_csv(rows, out + ".csv")
    table = _table(rows, ORACLE_COLUMNS)
    text = (f"# Guided samplers against the exact conditional p(x_0 | y={CLASS}) (oracle)\n\n"
            f"{n} samples per run, one shared set of starting noise, float64, VP SDE; reference "
            f"{n_ref} exact samples of p(x_0 | y); floor = exact samples of the same size "
            f"(mean ± sd over {floors} sets). `python benchmarks/guidance.py oracle"
            f"{' --quick' if args.quick else ''}`\n\n{table}")
    write_text(out + ".md", text)
    return text


# ---- digits ---------------------------------------------------------------------------------------
def _picture(panels: Dict[str, torch.Tensor], classes: int, per_row: int, path: str) -> str:
    """One panel per (variant, scale): ``classes`` rows of ``per_row`` images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sde_diffusion._files import atomic_write
    from sde_diffusion.reports import image_grid

    names = list(panels)
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig = Figure(figsize=(2.6 * ncol, 3.0 * nrow), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.imshow(image_grid(panels[name], nrow=per_row), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def run_digits(args) -> str:
    from sde_diffusion.checkpoints import latest_checkpoint, load_checkpoint, model_from_checkpoint
    from sde_diffusion.data import digits
    from sde_diffusion.metrics import digits_classifier, digits_features, frechet_distance

    path = args.checkpoint
    if os.path.isdir(path):
        path = latest_checkpoint(path)
        if path is None:
            raise SystemExit(f"guidance.py: no checkpoint in {args.checkpoint!r}")
    ckpt = load_checkpoint(path)
    model, sde, config = model_from_checkpoint(path)
    K = getattr(model.net, "num_classes", None)
    if K is None:
        raise SystemExit(f"guidance.py: {path} is not class-conditional (model.num_classes unset)")
    step, n_iters = int(ckpt["step"]), int(config.training.n_iters)
    per = args.per_class
    labels = torch.arange(K).repeat(per)                       # sample i has class i mod K
    n = labels.shape[0]
    shape = (n,) + tuple(ckpt["data_shape"])
    test = digits(int(config.data.image_size), "test")
    train = digits(int(config.data.image_size), "train")
    n_floor = min(n, train.shape[0])
    floor = frechet_distance(train[:n_floor], test)
    clf = digits_classifier()
    lo, hi = (float(v) for v in args.interval.split(","))
    rows, panels = [], {}
    for variant, interval in (("plain", None), (f"interval ({lo:g}, {hi:g}]", (lo, hi))):
        for s in args.scales:
            guided = ClassifierFreeGuidance(model, s, interval=interval).bind(y=labels)
            start = time.perf_counter()
            out = sample(guided, shape=shape, solver="dpm_solver++", steps=args.steps,
                         generator=args.seed)
            wall = time.perf_counter() - start
            x = out.samples.float().clamp(-1, 1)
            with torch.no_grad():                              # the CNN's head on its features
                logits = clf.head(digits_features(x).float())
            acc = float((logits.argmax(1) == labels).double().mean())
            fd = frechet_distance(x, test)
            rows.append({"variant": variant, "scale_s": s, "w": s - 1, "n": n,
                         "accuracy": acc, "frechet": fd, "frechet_real_floor": floor,
                         "nfe": out.nfe, "network_calls": guided.network_calls,
                         "wall_s": wall})
            print(f"  {variant} s={s:g}: accuracy {acc:.3f}, FD {fd:.2f} (floor {floor:.2f}), "
                  f"nfe {out.nfe}, {wall:.0f} s", flush=True)
            m = min(per, 8)
            order = torch.cat([torch.nonzero(labels == c).squeeze(1)[:m] for c in range(K)])
            panels[f"{'interval' if interval else 'plain'} s={s:g}"] = x[order].cpu()
    out = args.out + "_digits"
    write_csv(rows, out + ".csv")
    _picture(panels, K, min(per, 8), out + ".png")
    table = _table(rows, DIGITS_COLUMNS)
    text = (f"# Classifier-free guidance on digits\n\nCheckpoint `{path}` at step {step} of "
            f"{n_iters}{'' if step >= n_iters else ' (training NOT finished)'}; {per} samples per "
            f"class ({n} in all), DPM-Solver++(2M) at {args.steps} steps; accuracy = the digits "
            f"CNN's on the requested class; Fréchet distance to the {test.shape[0]} test images "
            f"(floor: the first {n_floor} training images, {floor:.2f}). Picture: "
            f"`{os.path.basename(out)}.png` (one row per class).\n\n{table}")
    write_text(out + ".md", text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("oracle", "digits"))
    p.add_argument("--checkpoint", default=None, help="digits: a class-conditional checkpoint")
    p.add_argument("--n", type=int, default=4000, help="oracle: samples per run (default 4000)")
    p.add_argument("--per-class", type=int, default=100, help="digits: samples per class")
    p.add_argument("--steps", type=int, default=20, help="digits: DPM-Solver++ steps (default 20)")
    p.add_argument("--scales", default="0,1,2,4", help="digits: guidance scales s (default 0,1,2,4)")
    p.add_argument("--interval", default="0.28,5.42", help="digits: the guidance interval LO,HI")
    p.add_argument("--quick", action="store_true", help="oracle: small sizes, one NFE (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "guidance"),
                   help="output prefix (default benchmarks/results/guidance)")
    args = p.parse_args(argv)
    args.scales = [float(v) for v in args.scales.split(",")]
    torch.set_num_threads(args.threads)
    if args.part == "digits":
        if not args.checkpoint:
            p.error("digits needs --checkpoint PATH (a class-conditional digits model)")
        print(run_digits(args))
    else:
        print(run_oracle(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
