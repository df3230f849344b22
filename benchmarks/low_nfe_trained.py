"""Low-NFE frontier on trained networks (issue 15's check that the default rule is not tuned to the
exact mixtures alone, and the data its rule for learned networks is chosen from).

No exact answer here: for each checkpoint the reference is a 1000-step UniPC (order 3, log-SNR grid)
run from the same starting states; at each budget every configuration of ours, and the default
``sample(model, nfe=N)``, is scored by its RMS distance to that reference (over samples and
coordinates). Then, per budget, each configuration's error / the best configuration's error on that
checkpoint, pooled over the checkpoints by the geometric mean (and the worst case), the statistic
the mixture rule was chosen by (benchmarks/low_nfe.py --rule).

    python benchmarks/low_nfe_trained.py --checkpoint digits_vp=runs/digits_vp \\
        --checkpoint digits_ve=runs/digits_ve --checkpoint moons_vp=runs/moons_vp   # ~10 min each digits
    python benchmarks/low_nfe_trained.py --checkpoint runs/digits_vp --n 16 --quick   # smoke run

Writes benchmarks/results/low_nfe_trained.{md,csv}.

    python benchmarks/low_nfe_trained.py --afs --checkpoint ... --n 128   # the first-step check

``--afs`` instead compares, paired on the same ``x_T``, the network rule's configuration at each
budget with and without the analytical first step (``analytic_first_step``; checkpoints whose SDE
refuses it are skipped with a note) and writes ``<out>_afs.{md,csv}``: the evidence for the
rule's choice of it.

    python benchmarks/low_nfe_trained.py --grids --checkpoint ... --n 1024 --reference-steps 200

``--grids`` runs the network rule's solver, options and first step at each budget on each grid of
``GRID_CANDIDATES`` (the focus grid's default shape, uniform share 0.2, width 1.5; quadratic,
Karras, log-SNR), paired on the same ``x_T``, and writes ``<out>_grids.{md,csv}``: each grid's
error over the rule's own grid's, per network and by the geometric mean. 1024 states: as on the
mixtures, a few hundred rank grids by chance (the reference's 200 UniPC-3 steps are far more
accurate than the differences measured).
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
from sde_diffusion.samplers.api import ANALYTIC_MAX_SNR, auto_config, start_snr  # noqa: E402
from sde_diffusion._files import write_text  # noqa: E402
from low_nfe import AFS, GRIDS, geo_mean, grid_label, label, with_afs  # noqa: E402

NFES = (4, 5, 6, 8, 10, 12, 15)
#: each also with the analytical first step ("+afs"); on an SDE that refuses it (alpha/sigma at T
#: above ANALYTIC_MAX_SNR) a "+afs" row repeats its plain twin's error, as the rule falls back
CONFIGS = with_afs([("unipc", {"order": p, "lower_order_final": True}) for p in (2, 3)]
                   + [("ipndm", {"order": p}) for p in (3, 4)]
                   + [("dpm_solver++", {"order": 2}), ("deis", {}), ("ddim", {})])
DEFAULT = "default: sample(model, nfe=N)"


def _named(spec: str):
    """``NAME=PATH`` or ``PATH`` (then the folder's or file's name)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (Path(spec).name.replace(".pt", ""), spec)


def _setup(path: str, n: int, ref_steps: int):
    """``(model, run, rms)``: the checkpoint's model, ``run(**kw)`` sampling from the fixed
    ``x_T`` and ``rms(x)``, the RMS distance to the reference from the same ``x_T``."""
    if Path(path).is_dir():
        path = latest_checkpoint(path)
    model, sde, _ = model_from_checkpoint(path, use_ema=True)
    shape = tuple(load_checkpoint(path)["data_shape"])
    x_T = sde.prior_sampling((n,) + shape, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        with torch.no_grad():
            return sample(model, x_T=x_T.clone(), progress=False, **kw)

    ref = run(solver="unipc", steps=ref_steps, grid="logsnr", order=3).samples.double()
    return model, run, lambda x: float((x.double() - ref).pow(2).mean().sqrt())


def afs_pairs(name: str, path: str, nfes, n: int, ref_steps: int) -> list:
    """The network rule's configuration with and without the analytical first step, per budget."""
    model, run, rms = _setup(path, n, ref_steps)
    if start_snr(model.sde, model.sde.T) > ANALYTIC_MAX_SNR:
        print(f"{name}: its SDE starts at alpha/sigma > {ANALYTIC_MAX_SNR}, no first step to test",
              file=sys.stderr)
        return []
    rows = []
    for nfe in nfes:
        cfg = auto_config(None, nfe)       # the network rule (None: a learned network)
        kw = dict(solver=cfg["solver"], nfe=nfe, grid=cfg["grid"], sigma_data=cfg["sigma_data"],
                  **cfg["options"])
        plain, afs = (rms(run(analytic_first_step=a, **kw).samples) for a in (False, True))
        rows.append({"checkpoint": name, "nfe": nfe, "config": label(cfg["solver"], cfg["options"],
                                                                     cfg["grid"]),
                     "error": plain, "error_afs": afs, "ratio": afs / plain})
    return rows


def _paired_report(rows, names, args, suffix: str, title: str, intro: str, column: str,
                   table) -> None:
    """Write ``<out><suffix>.{csv,md}``: a table of per-network ratios, one row per entry of
    ``table`` = ``(nfe, row label, {network: cell text}, ratios)``, with their geometric mean and
    how many are below 1."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, str(out) + suffix + ".csv")
    lines = [f"# {title}", "", intro, "",
             f"| NFE | {column} | " + " | ".join(names) + " | geo. mean | better on |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for nfe, label_, cells, ratios in table:
        if ratios:
            lines.append(f"| {nfe} | {label_} | " + " | ".join(cells.get(c, "-") for c in names)
                         + f" | {geo_mean(ratios):.2f} | {sum(r < 1 for r in ratios)} of {len(ratios)} |")
    write_text(str(out) + suffix + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_afs(rows, names, nfes, args, elapsed) -> None:
    command = " ".join(f"--checkpoint {c}" for c in args.checkpoint)
    intro = (f"`python benchmarks/low_nfe_trained.py --afs {command} --nfe {args.nfe} --n {args.n}`: "
             f"one CPU thread, {elapsed / 60:.1f} min. The network rule's configuration at each "
             f"budget, without and with `analytic_first_step` (same x_T, same budget: one step "
             f"more with it); error as in low_nfe_trained.md; ratio = with / without.")
    table = []
    for nfe in nfes:
        at = {r["checkpoint"]: r for r in rows if r["nfe"] == nfe}
        if at:
            cells = {c: f"{r['error']:.2e} -> {r['error_afs']:.2e} ({r['ratio']:.2f})"
                     for c, r in at.items()}
            table.append((nfe, next(iter(at.values()))["config"], cells,
                          [at[c]["ratio"] for c in names if c in at]))
    _paired_report(rows, names, args, "_afs", "The analytical first step on trained networks "
                   "(issue 15)", intro, "configuration", table)


#: ``--grids``: (label, grid, focus width, focus share) tried with the network rule's solver
GRID_CANDIDATES = (("focus(2,0.4)", "focus", 2.0, 0.4), ("focus(2,0.2)", "focus", 2.0, 0.2),
                   ("focus(1.5,0.4)", "focus", 1.5, 0.4), ("quadratic", "quadratic", None, None),
                   ("karras", "karras", None, None), ("logsnr", "logsnr", None, None))


def grid_rows(name: str, path: str, nfes, n: int, ref_steps: int) -> list:
    """The network rule at each budget (its solver, options and first step) on each grid of
    :data:`GRID_CANDIDATES`; ``rule`` marks the grid the rule itself takes."""
    model, run, rms = _setup(path, n, ref_steps)
    rows = []
    for nfe in nfes:
        cfg = auto_config(model, nfe)
        rule = grid_label(cfg)
        for tag, grid, width, share in GRID_CANDIDATES:
            shape = dict(focus_width=width, focus_share=share) if grid == "focus" else {}
            out = run(nfe=nfe, grid=grid, **shape)
            rows.append({"checkpoint": name, "nfe": nfe, "grid": tag, "rule": tag == rule,
                         "config": label(cfg["solver"], cfg["options"], tag),
                         "error": rms(out.samples)})
    return rows


def write_grids(rows, names, nfes, args, ref_steps, elapsed) -> None:
    command = " ".join(f"--checkpoint {c}" for c in args.checkpoint)
    intro = (f"`python benchmarks/low_nfe_trained.py --grids {command} --nfe {args.nfe} --n {args.n} "
             f"--reference-steps {ref_steps}`: {torch.get_num_threads()} CPU threads, "
             f"{elapsed / 60:.1f} min. The network rule's solver, options and first step at each "
             f"budget on each candidate grid; cell: error / the error on the rule's own grid "
             f"(**bold**), same x_T; error as in low_nfe_trained.md against a {ref_steps}-step "
             f"UniPC-3.")
    table = []
    for nfe in nfes:
        at = [r for r in rows if r["nfe"] == nfe]
        base = {r["checkpoint"]: r["error"] for r in at if r["rule"]}
        for tag, *_ in GRID_CANDIDATES:
            ratio = {r["checkpoint"]: r["error"] / base[r["checkpoint"]] for r in at
                     if r["grid"] == tag and r["checkpoint"] in base}
            rule = any(r["rule"] for r in at if r["grid"] == tag)
            table.append((nfe, f"**{tag}**" if rule else tag,
                          {c: f"{v:.2f}" for c, v in ratio.items()},
                          [ratio[c] for c in names if c in ratio]))
    _paired_report(rows, names, args, "_grids", "The network rule's grid on trained networks "
                   "(issue 15)", intro, "grid", table)


def run_checkpoint(name: str, path: str, nfes, n: int, ref_steps: int, grids) -> list:
    """Every configuration's and the default's error at each budget on one checkpoint."""
    model, run, rms = _setup(path, n, ref_steps)
    afs_allowed = start_snr(model.sde, model.sde.T) <= ANALYTIC_MAX_SNR
    rows = []
    for nfe in nfes:
        out = run(nfe=nfe)
        afs = AFS if out.config.get("analytic_first_step") else {}
        rows.append({"checkpoint": name, "nfe": nfe, "method": DEFAULT, "error": rms(out.samples),
                     "config": label(out.config["solver"], {**out.config["options"], **afs},
                                     out.config["grid"]) + f" (sigma_data {out.config['sigma_data']:g})"})
        for solver, options in CONFIGS:
            for grid in grids:
                if options.get("analytic_first_step") and not afs_allowed:
                    plain = {k: v for k, v in options.items() if k not in AFS}
                    twin = next((r for r in rows if r["nfe"] == nfe
                                 and r["method"] == label(solver, plain, grid)), None)
                    if twin is not None:
                        rows.append({**twin, "method": label(solver, options, grid)})
                    continue
                try:
                    res = run(solver=solver, nfe=nfe, grid=grid, **options)
                except (ValueError, RuntimeError) as err:   # a budget below the solver's minimum
                    print(f"skip {label(solver, options, grid)} @ {nfe}: {err}", file=sys.stderr)
                    continue
                rows.append({"checkpoint": name, "nfe": nfe, "method": label(solver, options, grid),
                             "error": rms(res.samples), "config": ""})
    return rows


def pooled(rows: list, names, nfe: int) -> list:
    """``(geometric mean, max, method, ratios)`` of error / the checkpoint's best fixed
    configuration at ``nfe``, over the checkpoints, best first (the default included)."""
    at = [r for r in rows if r["nfe"] == nfe]
    best = {c: min(r["error"] for r in at if r["checkpoint"] == c and r["method"] != DEFAULT)
            for c in names}
    out = []
    for method in dict.fromkeys(r["method"] for r in at):
        err = {r["checkpoint"]: r["error"] for r in at if r["method"] == method}
        if set(err) != set(names):
            continue
        ratios = [err[c] / best[c] for c in names]
        out.append((geo_mean(ratios), max(ratios), method, ratios))
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="NAME=PATH or PATH: a checkpoint file or workdir (repeat for several)")
    ap.add_argument("--nfe", default=",".join(map(str, NFES)),
                    help=f"comma-separated budgets (default {','.join(map(str, NFES))})")
    ap.add_argument("--n", type=int, default=256, help="starting states (default 256)")
    ap.add_argument("--reference-steps", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 reference steps, 2 grids")
    ap.add_argument("--afs", action="store_true",
                    help="only the network rule with and without the analytical first step")
    ap.add_argument("--grids", action="store_true",
                    help="only the network rule on each candidate grid (focus shapes, quadratic, "
                         "karras, log-SNR): <out>_grids.{md,csv}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "low_nfe_trained"))
    args = ap.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    checkpoints = [_named(spec) for spec in args.checkpoint]
    names = [c for c, _ in checkpoints]
    if len(set(names)) != len(names):
        ap.error(f"two checkpoints share a name: {names}; write NAME=PATH")
    began = time.perf_counter()
    ref_steps = 50 if args.quick else args.reference_steps
    grids = GRIDS[:2] if args.quick else GRIDS
    rows = []
    if args.afs:
        for name, path in checkpoints:
            rows += afs_pairs(name, path, nfes, args.n, ref_steps)
        write_afs(rows, [c for c in names if any(r["checkpoint"] == c for r in rows)], nfes, args,
                  time.perf_counter() - began)
        return 0
    if args.grids:
        for name, path in checkpoints:
            rows += grid_rows(name, path, nfes, args.n, ref_steps)
            print(f"{name} done ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
        write_grids(rows, names, nfes, args, ref_steps, time.perf_counter() - began)
        return 0
    for name, path in checkpoints:
        rows += run_checkpoint(name, path, nfes, args.n, ref_steps, grids)
        print(f"{name} done ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    write_results(rows, names, nfes, args, ref_steps, time.perf_counter() - began)
    return 0


def write_results(rows, names, nfes, args, ref_steps, elapsed) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, str(out) + ".csv", columns=["checkpoint", "nfe", "method", "error", "config"])
    command = " ".join(f"--checkpoint {c}" for c in args.checkpoint)
    lines = ["# Low-NFE frontier on trained networks (issue 15)", "",
             f"`python benchmarks/low_nfe_trained.py {command} --nfe {args.nfe}"
             f"{' --quick' if args.quick else ''}`: {args.n} starting states per checkpoint, one CPU "
             f"thread, {elapsed / 60:.1f} min. Error: RMS distance over samples and coordinates to a "
             f"{ref_steps}-step UniPC (order 3, log-SNR grid) from the same x_T; ratio: error / the "
             f"best fixed configuration's on the same checkpoint.", "",
             "## The default against the best, pooled over the checkpoints", "",
             "| NFE | best by geometric mean | geo. mean | max | default | geo. mean | max | "
             + " | ".join(f"default / best: {c}" for c in names) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(names)]
    ranked_at = {nfe: pooled(rows, names, nfe) for nfe in nfes}
    for nfe in nfes:
        ranked = ranked_at[nfe]
        top = next(r for r in ranked if r[2] != DEFAULT)
        dflt = next(r for r in ranked if r[2] == DEFAULT)
        config = next(r["config"] for r in rows if r["nfe"] == nfe and r["method"] == DEFAULT)
        lines.append(f"| {nfe} | {top[2]} | {top[0]:.2f} | {top[1]:.2f} | {config} | {dflt[0]:.2f} | "
                     f"{dflt[1]:.2f} | " + " | ".join(f"{x:.2f}" for x in dflt[3]) + " |")
    lines += ["", "## The five best configurations per budget", "",
              "| NFE | rank | method | geo. mean | max | " + " | ".join(names) + " |",
              "|---|---|---|---|---|" + "---|" * len(names)]
    for nfe in nfes:
        ranked = [r for r in ranked_at[nfe] if r[2] != DEFAULT]
        for i, (g, m, method, ratios) in enumerate(ranked[:5], 1):
            lines.append(f"| {nfe} | {i} | {method} | {g:.2f} | {m:.2f} | "
                         + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    for name in names:
        lines += ["", f"## {name}: every configuration's error", "",
                  "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        mine = [r for r in rows if r["checkpoint"] == name]
        for method in dict.fromkeys(r["method"] for r in mine):
            cells = []
            for nfe in nfes:
                hit = [r for r in mine if r["nfe"] == nfe and r["method"] == method]
                cells.append(f"{hit[0]['error']:.3e}" if hit else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    write_text(str(out) + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(nfes)]))


if __name__ == "__main__":
    sys.exit(main())
