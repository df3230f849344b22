"""Low-NFE frontier on a trained digits U-Net (issue 15's check that the default rule is not tuned to
the mixture alone). No exact answer here: the reference is a 1000-step UniPC (order 3, log-SNR grid)
run from the same starting states; at NFE 4, 6, 8, 10 every configuration of ours, and the default
``sample(model, nfe=N)``, is scored by its RMS distance to that reference (over samples and pixels).

    python benchmarks/low_nfe_digits.py --checkpoint runs/digits_vp   # ~12 min on one thread
    python benchmarks/low_nfe_digits.py --checkpoint runs/digits_vp --n 16 --quick   # smoke run

Writes benchmarks/results/low_nfe_digits.{md,csv}: per budget each configuration's error, the best,
the default, and ``default / best`` (the issue's target on the mixture: at most 1.2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sde_diffusion.checkpoints import latest_checkpoint, load_checkpoint, model_from_checkpoint  # noqa: E402
from sde_diffusion.reports import write_csv  # noqa: E402
from sde_diffusion.samplers import sample  # noqa: E402
from sde_diffusion._files import write_text  # noqa: E402
from low_nfe import GRIDS, label  # noqa: E402

NFES = (4, 6, 8, 10)
CONFIGS = ([("unipc", {"order": p, "lower_order_final": True}) for p in (2, 3)]
           + [("ipndm", {"order": p}) for p in (3, 4)]
           + [("dpm_solver++", {"order": 2}), ("deis", {}), ("ddim", {})])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a digits checkpoint file or workdir")
    ap.add_argument("--n", type=int, default=256, help="starting states (default 256)")
    ap.add_argument("--reference-steps", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 reference steps, 2 grids")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "low_nfe_digits"))
    args = ap.parse_args(argv)
    began = time.perf_counter()
    path = args.checkpoint
    if Path(path).is_dir():
        path = latest_checkpoint(path)
    model, sde, _ = model_from_checkpoint(path, use_ema=True)
    shape = tuple(load_checkpoint(path)["data_shape"])
    x_T = sde.prior_sampling((args.n,) + shape, generator=torch.Generator().manual_seed(0))
    ref_steps = 50 if args.quick else args.reference_steps
    grids = GRIDS[:2] if args.quick else GRIDS

    def run(**kw):
        with torch.no_grad():
            return sample(model, x_T=x_T.clone(), progress=False, **kw)

    ref = run(solver="unipc", steps=ref_steps, grid="logsnr", order=3).samples.double()

    def rms(x):
        return float((x.double() - ref).pow(2).mean().sqrt())

    rows = []
    for nfe in NFES:
        out = run(nfe=nfe)
        rows.append({"nfe": nfe, "method": "default: sample(model, nfe=N)", "error": rms(out.samples),
                     "config": label(out.config["solver"], out.config["options"], out.config["grid"])
                     + f" (sigma_data {out.config['sigma_data']:g})"})
        for solver, options in CONFIGS:
            for grid in grids:
                try:
                    res = run(solver=solver, nfe=nfe, grid=grid, **options)
                except (ValueError, RuntimeError) as err:   # a budget below the solver's minimum
                    print(f"skip {label(solver, options, grid)} @ {nfe}: {err}", file=sys.stderr)
                    continue
                rows.append({"nfe": nfe, "method": label(solver, options, grid), "error": rms(res.samples),
                             "config": ""})
        print(f"NFE {nfe} done ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    elapsed = time.perf_counter() - began
    write_results(rows, args, path, ref_steps, elapsed)
    return 0


def write_results(rows, args, path, ref_steps, elapsed) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, str(out) + ".csv")
    lines = ["# Low-NFE frontier on a trained digits U-Net (issue 15)", "",
             f"`python benchmarks/low_nfe_digits.py --checkpoint {args.checkpoint}`"
             f"{' --quick' if args.quick else ''}, checkpoint `{Path(path).name}`, {args.n} starting "
             f"states, one CPU thread, {elapsed / 60:.1f} min. Error: RMS distance over samples and pixels "
             f"to a {ref_steps}-step UniPC (order 3, log-SNR grid) from the same x_T.", "",
             "| NFE | our best (fixed grid) | error | default | error | default / best |",
             "|---|---|---|---|---|---|"]
    for nfe in NFES:
        at = [r for r in rows if r["nfe"] == nfe]
        ours = [r for r in at if not r["method"].startswith("default")]
        best = min(ours, key=lambda r: r["error"])
        default = [r for r in at if r["method"].startswith("default")][0]
        lines.append(f"| {nfe} | {best['method']} | {best['error']:.3e} | {default['config']} | "
                     f"{default['error']:.3e} | {default['error'] / best['error']:.2f} |")
    lines += ["", "## Every configuration", "", "| method | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
              "|---|" + "---|" * len(NFES)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for nfe in NFES:
            hit = [r for r in rows if r["nfe"] == nfe and r["method"] == method]
            cells.append(f"{hit[0]['error']:.3e}" if hit else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    write_text(str(out) + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines[:4 + 2 + len(NFES)]))


if __name__ == "__main__":
    sys.exit(main())
