"""Wall time of one study run in one process on all threads against ``--workers`` processes of a
thread each (``sde-diffusion study --workers``), side by side on the same checkpoint and cells.

    python benchmarks/study_workers.py --checkpoint /work/runs/digits_vp   # ~4 min on 2 idle cores

Both runs score the same (cell, seed) pairs (a ``ddim-table`` at ``--steps``, ``--n`` samples,
``--seeds`` seeds) and must give the same distances up to the float rounding of a different
thread count; the ratio is what the option buys on this machine. Writes
``benchmarks/results/study_workers.{md,csv}``. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sde_diffusion.reports import provenance, write_csv, write_markdown_table  # noqa: E402
from sde_diffusion.studies import make_study, run_study, worker_threads  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a digits checkpoint file or workdir")
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "study_workers"))
    args = ap.parse_args(argv)
    from sde_diffusion.cli_common import _load_model

    model, _, _, _, shape = _load_model(argparse.Namespace(checkpoint=args.checkpoint, oracle=None,
                                                           device="cpu"))
    study = make_study("ddim-table", [int(s) for s in args.steps.split(",")])
    threads = torch.get_num_threads()
    rows, results = [], {}
    for workers in (1, args.workers):
        start = time.perf_counter()
        with torch.no_grad():
            res = run_study(study, model, n=args.n, seeds=args.seeds, shape=shape, workers=workers)
        wall = time.perf_counter() - start
        results[workers] = res
        rows.append({"workers": workers, "threads_each": worker_threads(workers),
                     "wall_s": round(wall, 1)})
        print(f"workers {workers}: {wall:.1f} s", flush=True)
    base = rows[0]["wall_s"]
    for r in rows:
        r["speed_up"] = round(base / r["wall_s"], 2)
    one, many = results[1].fd, results[args.workers].fd
    diff = max(abs(a - b) for k in one for a, b in zip(one[k], many[k]))
    write_csv(rows, args.out + ".csv")
    info = provenance(command="python benchmarks/study_workers.py " + " ".join(sys.argv[1:]))
    with open(args.out + ".md", "w", encoding="utf-8") as fh:
        fh.write("# `study --workers`: one process on all threads against one-thread workers\n\n"
                 f"`ddim-table` at steps {args.steps}, n = {args.n}, {args.seeds} seeds "
                 f"({len(study.cells) * args.seeds} (cell, seed) pairs), checkpoint "
                 f"`{args.checkpoint}`, {threads} threads, torch {torch.__version__}, "
                 f"{info.get('platform', '')}.\n\n")
        fh.write(write_markdown_table(rows))
        fh.write(f"\nLargest difference of a per-seed Fréchet distance between the two runs: "
                 f"{diff:.2e} (the rounding of a different thread count).\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
