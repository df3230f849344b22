"""Adapter overhead: a diffusers ``UNet2DModel`` (32x32) called through ``from_diffusers`` -- the
way every solver calls it, ``model.at_scales("eps", x, t, alpha, sigma)`` -- against calling the
network directly, ``unet(x, timestep).sample``, on the same input, in the same process.

Two measurements:

- *end to end*: median seconds per call of each, interleaved (direct, adapter, direct, ...)
  ``--repeats`` times of ``--calls`` calls, so the noise of a shared machine falls on both alike;
  the overhead is ``adapter / direct - 1``;
- *the adapter's own cost*: the same adapter around a network that returns at once (a zero
  tensor), minus that network called directly: the microseconds the wrapper adds per call
  (timestep mapping, dtype handling, the finiteness check, the NFE count), independent of the
  network's noise. Divided by the direct U-Net time it is the overhead without timing noise.

    python benchmarks/adapters.py                    # CPU, batch 1 and 8, 32x32, 3 channels
    python benchmarks/adapters.py --batch 1 --repeats 3 --calls 5

Needs diffusers (pip install "sde_diffusion[ecosystem]"). Writes
benchmarks/results/adapters_overhead.md and .csv (``--out`` to change). Target: below 5%.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion._files import write_text  # noqa: E402
from sde_diffusion.models.adapters import from_diffusers  # noqa: E402


def make_unet():
    """A DDPM-CIFAR-10-shaped UNet2DModel, narrower (channels 64, 128, 128, 128) to keep CPU
    runs short; random weights (the timing does not depend on them)."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(64, 128, 128, 128),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=32).eval()


def per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(batch: int, repeats: int, calls: int) -> dict:
    from diffusers import DDPMScheduler
    unet = make_unet()
    sched = DDPMScheduler()
    model = from_diffusers(unet, sched)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    k = 500
    t_val = (k + 1) / 1000
    t = torch.full((batch,), t_val)
    alpha, sigma = float(model.sde.alpha(torch.tensor(t_val, dtype=torch.float64))), \
        float(model.sde.sigma(torch.tensor(t_val, dtype=torch.float64)))
    ts = torch.full((batch,), float(k))

    def direct():
        return unet(x, ts).sample

    def adapter():
        return model.at_scales("eps", x, t, alpha, sigma)

    zero = torch.nn.Module()                    # a "network" that returns at once
    zero.forward = lambda x, timestep, class_labels=None: torch.zeros_like(x)  # type: ignore[assignment]
    null_model = from_diffusers(zero, sched)

    def null_direct():
        return zero(x, ts)

    def null_adapter():
        return null_model.at_scales("eps", x, t, alpha, sigma)

    with torch.no_grad():
        assert torch.equal(direct(), adapter())
        for fn in (direct, adapter):
            fn()                                # warm-up
        d, a = [], []
        for _ in range(repeats):
            d.append(per_call(direct, calls))
            a.append(per_call(adapter, calls))
        nd, na = [], []
        for _ in range(max(repeats, 5)):
            nd.append(per_call(null_direct, 2000))
            na.append(per_call(null_adapter, 2000))
    direct_s, adapter_s = statistics.median(d), statistics.median(a)
    own_us = (statistics.median(na) - statistics.median(nd)) * 1e6
    return {"batch": batch, "direct_ms": direct_s * 1e3, "adapter_ms": adapter_s * 1e3,
            "overhead_pct": 100 * (adapter_s / direct_s - 1),
            "direct_min_ms": min(d) * 1e3, "adapter_min_ms": min(a) * 1e3,
            "adapter_own_us": own_us, "own_pct": 100 * own_us * 1e-6 / direct_s,
            "repeats": repeats, "calls": calls}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "adapters_overhead"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(b, args.repeats, args.calls) for b in args.batch]
    cols = list(rows[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    write_text(args.out + ".csv", buf.getvalue())
    lines = [
        "# Adapter overhead: from_diffusers vs the UNet2DModel called directly",
        "",
        f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} thread(s), 32x32x3 UNet2DModel (channels 64/128/128/128, 2 layers per "
        f"block, attention at 16x16), float32; median of {args.repeats} interleaved repeats of "
        f"{args.calls} calls. `python benchmarks/adapters.py` (see its docstring).",
        "",
        "| batch | direct ms/call | adapter ms/call | overhead (end to end) | adapter's own cost | own cost / direct |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['direct_ms']:.2f} | {r['adapter_ms']:.2f} | "
                     f"{r['overhead_pct']:+.2f}% | {r['adapter_own_us']:.0f} us | {r['own_pct']:.3f}% |")
    lines += ["", "End to end is the difference of two noisy timings of the same network; the "
              "adapter's own cost (the wrapper around a network that returns at once, minus that "
              "network called directly) is the overhead free of that noise. Target: below 5%.", ""]
    write_text(args.out + ".md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
