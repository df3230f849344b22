"""Seed-to-seed spread of the digits Fréchet distance: is it wider for stochastic samplers?

The study tables (docs/studies.md) use 4 seeds per cell, and some stochastic rows spread far more
across seeds than the deterministic ones (DDIM eta = 1 at 1000 steps: 15.4 / 4.5 / 5.5 / 15.4;
score_sde's VP reverse diffusion at P1000: 17.4 / 4.7 / 10.8 / 19.0). Four values say little about
a spread, so this draws 16 seeds of two stochastic / deterministic pairs at 100 steps on the VP
digits checkpoint (a tenth of the 1000-step cost), as the study cells draw them (seeded samples,
Tweedie denoising, clamped to [-1, 1]), and compares the spreads (Levene's test, the ratio of
standard deviations) and the paired means (Student's t over the seeds):

- reverse diffusion vs probability-flow Euler, 150 samples per seed (score_sde's table's size);
- DDIM eta = 1 vs eta = 0, 250 samples per seed (DDIM's table's size).

    python benchmarks/study_dispersion.py --checkpoint runs/digits_vp     # ~20 min on one thread
    python benchmarks/study_dispersion.py --report-only values.json     # the report of saved values

Writes benchmarks/results/study_dispersion.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: (label, solver, options, samples per seed): the two pairs, stochastic first
PAIRS = ((("reverse diffusion", "reverse_diffusion", {}, 150), ("probability flow (Euler)", "ode_euler", {}, 150)),
         (("DDIM eta = 1", "ddim", {"eta": 1.0}, 250), ("DDIM eta = 0", "ddim", {"eta": 0.0}, 250)))


def measure(checkpoint: str, seeds: int, steps: int) -> dict:
    """``label -> [Fréchet distance per seed]``."""
    import torch

    from sde_diffusion import data
    from sde_diffusion.checkpoints import latest_checkpoint, model_from_checkpoint
    from sde_diffusion.metrics import frechet_distance
    from sde_diffusion.samplers import sample

    path = latest_checkpoint(checkpoint) if Path(checkpoint).is_dir() else checkpoint
    model, _, _ = model_from_checkpoint(path, use_ema=True)
    test = data.digits(8, "test")
    out = {}
    for pair in PAIRS:
        for label, solver, options, n in pair:
            out[label] = []
            for seed in range(seeds):
                with torch.no_grad():
                    x = sample(model, shape=(n, 1, 8, 8), solver=solver, steps=steps, generator=seed,
                               denoise=True, progress=False, **options).samples.clamp(-1, 1)
                out[label].append(float(frechet_distance(x, test, features="digits")))
                print(f"{label} seed {seed}: {out[label][-1]:.2f}", flush=True)
    return out


def report(values: dict, command: str, note: str, steps: int) -> str:
    from scipy import stats

    lines = ["# Seed-to-seed spread of the digits Fréchet distance (benchmarks/study_dispersion.py)", "",
             f"`{command}` ({note}): VP digits checkpoint, {steps} steps, Tweedie denoising, one seed = one "
             f"set of samples (150 for the score_sde pair, 250 for DDIM's).", "",
             "| sampler | seeds | mean | sd | min | max |", "|---|---|---|---|---|---|"]
    for label, v in values.items():
        lines.append(f"| {label} | {len(v)} | {statistics.mean(v):.2f} | {statistics.stdev(v):.2f} | "
                     f"{min(v):.2f} | {max(v):.2f} |")
    lines += ["", "| stochastic vs deterministic | sd ratio | Levene p | paired mean difference "
                  "(95%) |", "|---|---|---|---|"]
    for (a, *_), (b, *_) in PAIRS:
        x, y = values[a], values[b]
        d = [p - q for p, q in zip(x, y)]
        half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        lines.append(f"| {a} vs {b} | {statistics.stdev(x) / statistics.stdev(y):.2f} | "
                     f"{stats.levene(x, y).pvalue:.2f} | {statistics.mean(d):+.2f} ± {half:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="the VP digits checkpoint (file or workdir)")
    src.add_argument("--report-only", metavar="JSON", help="write the report of saved values")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "study_dispersion"))
    args = ap.parse_args(argv)
    began = time.perf_counter()
    if args.report_only:
        with open(args.report_only, encoding="utf-8") as fh:
            values = json.load(fh)
        command = f"python benchmarks/study_dispersion.py --report-only {args.report_only} --steps {args.steps}"
        note = "the values of a measuring run, saved"
    else:
        import torch

        torch.set_num_threads(1)
        values = measure(args.checkpoint, args.seeds, args.steps)
        command = (f"python benchmarks/study_dispersion.py --checkpoint {args.checkpoint} --seeds "
                   f"{args.seeds} --steps {args.steps}")
        note = f"{(time.perf_counter() - began) / 60:.0f} min, one thread"
    from sde_diffusion._files import write_json, write_text

    write_json(args.out + ".json", values)
    text = report(values, command, note, args.steps)
    write_text(args.out + ".md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
