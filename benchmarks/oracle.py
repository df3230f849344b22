"""Oracle benchmark: time per call of ``GaussianMixture.score``, ``x0``, ``eps`` and ``log_prob``
for isotropic, diagonal and full-covariance mixtures, against a plain matrix-product
implementation of the isotropic oracle written here as the baseline (issue 16).

The baseline (``Plain``) is the least an exact isotropic oracle does at one time ``t``: squared
distances ``||x||^2 - 2 alpha x.m_k + alpha^2 ||m_k||^2`` by one matrix product, log-sum-exp over
components, isotropic variances per component, the fields by one more product; no checks, no
chunking, in the input's dtype. Ours is timed through the public methods with ``t`` a number
(every sample at one time, as in fixed-grid solvers), so argument checks are included.

Targets (issue 16): isotropic within 1.5x of the baseline, diagonal within 3x of it, full
covariance within 5x of our isotropic oracle at D = 64. Peak memory is the most allocated at once
during one call beyond its output (torch's CPU profiler, allocation events summed in time order;
``torch.cuda.max_memory_allocated`` on a GPU).

Every (kind, method) and the baseline are timed in turn within each repeat (interleaved, so the
noise of a shared machine spreads evenly), each time as the mean of enough calls to take about
``--min-time`` seconds; the table reports the median over ``--repeats``. An entry whose one call
takes longer than ``--slow`` seconds (full covariances at D = 3072) is timed ``--slow-repeats``
times only.

    python benchmarks/oracle.py --threads 1              # the three sizes of issue 16, float64
    python benchmarks/oracle.py --quick                  # small sizes, seconds; prints only
    python benchmarks/oracle.py --device cuda --dtype float32

Writes benchmarks/results/oracle.md and .csv (``--out`` to change; ``--quick`` writes only with
``--out``).
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion import VPSDE, GaussianMixture, random_mixture  # noqa: E402
from sde_diffusion._files import atomic_write  # noqa: E402

CASES = [(4000, 64, 8), (2048, 3072, 10), (50000, 2, 25)]
QUICK_CASES = [(1000, 64, 8), (256, 768, 10), (5000, 2, 25)]
KINDS = ("isotropic", "diagonal", "full")
METHODS = ("score", "x0", "eps", "log_prob")
T = 0.3


class Plain:
    """The baseline: an isotropic mixture's exact oracle at one time, by matrix products."""

    def __init__(self, mix: GaussianMixture, device, dtype):
        K = mix.n_components
        self.sde = mix.sde
        self.M = mix.means.reshape(K, -1).to(device=device, dtype=dtype)
        self.s2 = (mix.stds.reshape(K, -1)[:, 0] ** 2).to(device=device, dtype=dtype)
        self.m2 = (self.M * self.M).sum(1)
        self.logw = mix.weights.log().to(device=device, dtype=dtype)

    def _parts(self, x, t):
        _, log_a, log_s = self.sde.log_scales(torch.tensor(t, dtype=torch.float64))
        a, s = float(log_a.exp()), float(log_s.exp())
        v = a * a * self.s2 + s * s
        d2 = (x * x).sum(1, keepdim=True) - 2 * a * (x @ self.M.T) + a * a * self.m2
        log_joint = self.logw - 0.5 * (d2 / v + x.shape[1] * torch.log(2 * math.pi * v))
        return log_joint, v, a, s

    def log_prob(self, x, t):
        return torch.logsumexp(self._parts(x, t)[0], dim=1)

    def score(self, x, t):
        log_joint, v, a, _ = self._parts(x, t)
        return self._field(log_joint, v, a, x)

    def _field(self, log_joint, v, a, x):
        rv = torch.softmax(log_joint, dim=1) / v
        return a * (rv @ self.M) - x * rv.sum(1, keepdim=True)

    def x0(self, x, t):
        log_joint, v, a, s = self._parts(x, t)
        r = torch.softmax(log_joint, dim=1)
        return (r * (s * s / v)) @ self.M + x * (r * (a * self.s2 / v)).sum(1, keepdim=True)

    def eps(self, x, t):
        log_joint, v, a, s = self._parts(x, t)
        return -s * self._field(log_joint, v, a, x)


def peak_bytes(fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Most bytes allocated at once during ``fn()`` beyond its output."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak - out.numel() * out.element_size()


def timed(fn: Callable[[], torch.Tensor], device: torch.device, calls: int) -> float:
    """Mean seconds per call over ``calls`` calls."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


BEFORE = r"""
import json, math, statistics, sys, time
from typing import Callable
import torch
torch.set_num_threads(int(sys.argv[1]))
from sde_diffusion import VPSDE, random_mixture
{peak}
B, D, K, T, dtype = {B}, {D}, {K}, {T}, torch.{dtype}
min_time, repeats, slow, slow_repeats = {min_time}, {repeats}, {slow}, {slow_repeats}
out = {{}}
for kind in ("isotropic", "diagonal"):
    mix = random_mixture(dim=D, n_components=K, seed=0, sde=VPSDE(), diagonal=kind == "diagonal")
    x = mix.sample(B, t=T, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for method in ("score", "x0", "eps", "log_prob"):
        f = getattr(mix, method)
        t0 = time.perf_counter(); f(x, T); one = time.perf_counter() - t0
        calls, reps = (1, slow_repeats) if one > slow else (max(1, math.ceil(min_time / one)), repeats)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                f(x, T)
            ts.append((time.perf_counter() - t0) / calls)
        out[kind + "." + method] = (statistics.median(ts), peak_bytes(lambda: f(x, T), x.device))
print(json.dumps(out))
"""


def before(path: str, B: int, D: int, K: int, args) -> Dict[str, tuple]:
    """Time the isotropic and diagonal oracle of the toolkit at ``path`` (a checkout of the code
    before issue 16) in a subprocess, the same way: ``{"kind.method": (seconds, peak bytes)}``."""
    code = BEFORE.format(peak=inspect.getsource(peak_bytes), B=B, D=D, K=K, T=T, dtype=args.dtype,
                         min_time=args.min_time, repeats=args.repeats, slow=args.slow,
                         slow_repeats=args.slow_repeats)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
    done = subprocess.run([sys.executable, "-c", code, str(torch.get_num_threads())], env=env,
                          capture_output=True, text=True, cwd=os.path.abspath(path))
    if done.returncode != 0:
        raise SystemExit(f"oracle benchmark: the --before run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build(kind: str, B: int, D: int, K: int, device, dtype):
    sde = VPSDE()
    mix = random_mixture(dim=D, n_components=K, seed=0, sde=sde, diagonal=kind == "diagonal",
                         full=kind == "full")
    x = mix.sample(B, t=T, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    return mix, x


def run_case(B: int, D: int, K: int, args, device, dtype) -> List[dict]:
    entries: Dict[tuple, Callable[[], torch.Tensor]] = {}
    inputs = {}
    for kind in KINDS:
        t0 = time.perf_counter()
        mix, x = build(kind, B, D, K, device, dtype)
        print(f"  built {kind} in {time.perf_counter() - t0:.1f} s", flush=True)
        inputs[kind] = x
        for method in METHODS:
            entries[(kind, method)] = (lambda f=getattr(mix, method), x=x: f(x, T))
        if kind == "isotropic":
            plain = Plain(mix, device, dtype)
            for method in METHODS:
                entries[("plain", method)] = (lambda f=getattr(plain, method), x=x: f(x, T))
    calls, repeats, times = {}, {}, {key: [] for key in entries}
    for key, fn in entries.items():                  # warm-up (caches, allocator) and calibration
        one = timed(fn, device, 1)
        if one > args.slow:                          # a slow entry: this call is its first repeat
            times[key].append(one)
            calls[key], repeats[key] = 1, args.slow_repeats
        else:
            one = timed(fn, device, 1)
            calls[key] = max(1, math.ceil(args.min_time / max(one, 1e-9)))
            repeats[key] = args.repeats
    for r in range(max(repeats.values())):
        for key, fn in entries.items():
            if len(times[key]) < repeats[key]:
                times[key].append(timed(fn, device, calls[key]))
        print(f"  repeat {r}: " + ", ".join(f"{k[0][:4]}.{k[1]} {v[r] * 1e3:.2f}" for k, v in times.items()
                                            if len(v) > r), flush=True)
    peaks = {key: peak_bytes(fn, device) for key, fn in entries.items()}
    med = {key: statistics.median(v) for key, v in times.items()}
    old = before(args.before, B, D, K, args) if args.before else {}
    rows = []
    in_bytes = inputs["isotropic"].numel() * inputs["isotropic"].element_size()
    for key in entries:
        kind, method = key
        rows.append({
            "batch": B, "dim": D, "components": K, "kind": kind, "method": method,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "threads": torch.get_num_threads(), "ms": med[key] * 1e3,
            "vs_plain": med[key] / med[("plain", method)],
            "vs_our_isotropic": med[key] / med[("isotropic", method)],
            "peak_extra_MB": peaks[key] / 2 ** 20, "peak_extra_over_input": peaks[key] / in_bytes,
            "peak_extra_over_batch_by_K": peaks[key] / (B * K * 8),
            "before_ms": old[f"{kind}.{method}"][0] * 1e3 if f"{kind}.{method}" in old else "",
            "before_peak_MB": old[f"{kind}.{method}"][1] / 2 ** 20 if f"{kind}.{method}" in old else "",
            "repeats": len(times[key]), "calls_per_repeat": calls[key],
            "all_ms": " ".join(f"{v * 1e3:.3f}" for v in times[key])})
    return rows


def write(rows: List[dict], out, command: str) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    if out:
        _write_text(out + ".csv", buf.getvalue())
    has_before = any(r["before_ms"] != "" for r in rows)
    lines = ["# Oracle benchmark", "",
             f"Median milliseconds per call over interleaved repeats (`{command}`): our "
             "`GaussianMixture` methods at one time t = 0.3 (VP SDE) against `Plain`, the plain "
             "matrix-product isotropic oracle written in the benchmark. `vs plain` divides by the "
             "baseline's time for the same method (on the isotropic mixture); `vs iso` by our isotropic "
             "time. Peak is the most memory allocated at once in one call beyond its output, in MB, "
             "as a multiple of the input's size and of a (batch, K) float64 tensor."
             + (" `before`: the per-component implementation this replaced (`--before`), timed the same "
                "way in a subprocess after ours, and its peak." if has_before else ""), "",
             "| batch, dim, K | kind | method | ms | vs plain | vs iso | peak MB | peak / input | "
             "peak / (batch, K) | repeats |" + (" before ms | before / ours | before peak MB |" if has_before else ""),
             "| --- " * (10 + 3 * has_before) + "|"]
    for r in rows:
        line = (f"| {r['batch']}, {r['dim']}, {r['components']} | {r['kind']} | {r['method']} | "
                f"{r['ms']:.3f} | {r['vs_plain']:.2f} | {r['vs_our_isotropic']:.2f} | "
                f"{r['peak_extra_MB']:.2f} | {r['peak_extra_over_input']:.2f} | "
                f"{r['peak_extra_over_batch_by_K']:.1f} | {r['repeats']} |")
        if has_before:
            line += (f" {r['before_ms']:.3f} | {r['before_ms'] / r['ms']:.1f} | {r['before_peak_MB']:.1f} |"
                     if r["before_ms"] != "" else " | | |")
        lines.append(line)
    lines += ["", "Targets (issue 16): isotropic within 1.5x of plain, diagonal within 3x of plain, full "
              "within 5x of our isotropic at D = 64.", ""]
    for r in rows:
        if r["kind"] == "isotropic":
            verdict = r["vs_plain"] <= 1.5
        elif r["kind"] == "diagonal":
            verdict = r["vs_plain"] <= 3.0
        elif r["kind"] == "full" and r["dim"] == 64:
            verdict = r["vs_our_isotropic"] <= 5.0
        else:
            continue
        if not verdict:
            lines.append(f"- missed: {r['kind']} {r['method']} at ({r['batch']}, {r['dim']}, {r['components']}): "
                         f"{r['vs_plain']:.2f}x plain, {r['vs_our_isotropic']:.2f}x our isotropic")
    text = "\n".join(lines) + "\n"
    if out:
        _write_text(out + ".md", text)
    return text


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, about 0.02 s per timing")
    p.add_argument("--cases", default="", help="B,D,K;B,D,K (default: the three of issue 16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slow", type=float, default=2.0, help="seconds per call above which a case is slow")
    p.add_argument("--slow-repeats", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.1, help="seconds per timing (calls are repeated)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--before", default="", help="a checkout of the code before issue 16 (e.g. a git "
                   "worktree of b317243): also time its isotropic and diagonal oracle, on the CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="path without suffix (default benchmarks/results/oracle)")
    args = p.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = os.path.join(ROOT, "benchmarks", "results", "oracle")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.min_time = min(args.repeats, 3), min(args.min_time, 0.02)
    cases = ([tuple(int(v) for v in c.split(",")) for c in args.cases.split(";")] if args.cases
             else QUICK_CASES if args.quick else CASES)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for B, D, K in cases:
        print(f"case batch={B} dim={D} K={K}", flush=True)
        rows += run_case(B, D, K, args, device, dtype)
    command = "python benchmarks/oracle.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write(rows, args.out, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
