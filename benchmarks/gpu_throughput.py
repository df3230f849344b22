"""Sampling throughput on a 32x32 diffusers ``UNet2DModel``: our DPM-Solver++(2M) through
``models.adapters.from_diffusers`` against diffusers' own pipeline loop with
``DPMSolverMultistepScheduler``, on the same network, steps, batch, dtype and device, in one run.

The three timed things, interleaved (floor, ours, diffusers, floor, ...) ``--repeats`` times after a
warm-up of each, with ``torch.cuda.synchronize()`` before and after every timing on a GPU:

- **ours**: ``sample(from_diffusers(unet, scheduler), x_T=x, solver="dpm_solver++_2m",
  solver_type="midpoint", grid=sde.time_of_timestep(timesteps), denoise=True)``: the options that
  reproduce ``DPMSolverMultistepScheduler()`` (DPM-Solver++ of Lu et al. 2022, Alg. 2, 2M,
  midpoint, final step to clean data; docs/models.md "Reproducing a scheduler's run"), K network
  evaluations;
- **diffusers**: ``scheduler.set_timesteps(K)`` then ``for t in scheduler.timesteps:
  x = scheduler.step(unet(x, t).sample, t, x).prev_sample`` (what ``DDPMPipeline``-style loops do);
- **network floor**: the bare ``unet(x, t).sample`` at the same K timesteps, nothing else.

Reported: images/s of each (batch / median seconds per batch), the ratio ours / diffusers, and for
each sampler the share of its wall time outside the network, ``1 - floor / time`` (target: < 5%).
The two samplers' outputs are compared too (max |ours - theirs| / max |theirs|: they compute the
same chain, ~1e-6 in float32).

    python benchmarks/gpu_throughput.py                      # CUDA if present; DDPM CIFAR-10 size
    python benchmarks/gpu_throughput.py --batch 256 --steps 20 --dtype float16
    python benchmarks/gpu_throughput.py --smoke --out /tmp/gt  # CPU seconds: tiny UNet, batch 2, 3 steps

The network is ``--unet ddpm`` (default): the configuration of DDPM's CIFAR-10 model as diffusers
ships it (``google/ddpm-cifar10-32``: channels 128/256/256/256, 2 ResNet blocks per level,
attention at 16x16; 35.7 M parameters), randomly initialised (no download: throughput does not
depend on the weights); ``--unet small`` is channels 64/128/128/128 (9 M), ``--unet tiny`` the
smoke test's. Needs diffusers (``pip install "sde_diffusion[ecosystem]"``). Writes
benchmarks/results/gpu_throughput.{md,csv,json} (``--out STEM`` to change; ``--smoke`` writes only
with ``--out``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion import sample  # noqa: E402
from sde_diffusion._files import write_json, write_text  # noqa: E402
from sde_diffusion.models.adapters import from_diffusers  # noqa: E402
from sde_diffusion.reports import write_csv  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "gpu_throughput")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNETS = {
    # google/ddpm-cifar10-32's UNet2DModel config (Ho et al. 2020, the CIFAR-10 model)
    "ddpm": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    "small": dict(block_out_channels=(64, 128, 128, 128), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D")),
}


def make_unet(kind: str, dtype: torch.dtype, device: torch.device):
    """A randomly initialised 32x32x3 ``UNet2DModel`` of the named size (seed 0), in eval mode."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **UNETS[kind])
    unet = unet.to(device)
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(args) -> Dict:
    from diffusers import DPMSolverMultistepScheduler
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet = make_unet(args.unet, dtype, device)
    n_params = sum(p.numel() for p in unet.parameters())
    scheduler = DPMSolverMultistepScheduler()        # dpmsolver++, order 2, midpoint, final sigma 0
    model = from_diffusers(unet, scheduler)
    x_T = torch.randn((args.batch, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    x_T = x_T.to(device=device, dtype=dtype)

    def ours() -> torch.Tensor:
        scheduler.set_timesteps(args.steps)          # the same timesteps as the diffusers loop
        grid = model.sde.time_of_timestep(scheduler.timesteps)
        out = sample(model, x_T=x_T, solver="dpm_solver++_2m", solver_type="midpoint", grid=grid,
                     denoise=True)
        assert out.nfe == args.steps, out.nfe
        return out.samples

    def theirs() -> torch.Tensor:
        scheduler.set_timesteps(args.steps, device=device)
        x = x_T * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_output = unet(x, t).sample
                x = scheduler.step(model_output, t, x).prev_sample
        return x

    scheduler.set_timesteps(args.steps, device=device)
    floor_ts = list(scheduler.timesteps)

    def floor() -> torch.Tensor:
        with torch.no_grad():
            for t in floor_ts:
                out = unet(x_T, t).sample
        return out

    fns = {"network floor": floor, "ours (dpm_solver++_2m)": ours,
           "diffusers (DPMSolverMultistepScheduler)": theirs}
    for fn in fns.values():                          # warm-up (kernels, allocator, cudnn choice)
        for _ in range(args.warmup):
            fn()
    a, b = ours().double(), theirs().double()
    agreement = float((a - b).abs().max() / b.abs().max())
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    floor_s = statistics.median(times["network floor"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"method": name, "seconds_per_batch": med, "min_seconds": min(ts),
                     "images_per_s": args.batch / med,
                     "outside_network_pct": 100 * (1 - floor_s / med) if name != "network floor" else 0.0,
                     "batch": args.batch, "steps": args.steps, "nfe": args.steps,
                     "dtype": args.dtype, "device": device.type, "unet": args.unet,
                     "repeats": args.repeats})
    ours_row, theirs_row = rows[1], rows[2]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)"
    import diffusers
    return {"rows": rows, "ratio": ours_row["images_per_s"] / theirs_row["images_per_s"],
            "agreement_rel": agreement, "device_name": name, "parameters": n_params,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}


def report(res: Dict, args) -> str:
    rows, cuda = res["rows"], res["rows"][0]["device"] == "cuda"
    r0 = rows[0]
    cmd = "python benchmarks/gpu_throughput.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in res["settings"].items()
        if k in ("unet", "batch", "steps", "dtype", "device", "repeats", "warmup", "threads")
        and v is not None)
    lines = ["# Sampling throughput: our DPM-Solver++(2M) vs diffusers' DPMSolverMultistepScheduler loop", ""]
    if not cuda:
        lines += ["**The GPU figures are owed**: this run is on the CPU (no GPU in the session that "
                  "wrote it), so it only shows that the benchmark runs and what it reports; CPU "
                  "timings of a shared machine say little about a GPU, where the cost outside the "
                  "network (Python, small kernels, launches) weighs far more. Run the command below "
                  "on a GPU and commit its files in place of these.", ""]
    lines += [f"{res['device_name']}, torch {res['torch']}, diffusers {res['diffusers']}; "
              f"UNet2DModel `{r0['unet']}` (32x32x3, {res['parameters'] / 1e6:.3g} M parameters, "
              f"random weights), batch {r0['batch']}, {r0['steps']} steps ({r0['nfe']} network "
              f"evaluations), {r0['dtype']}; median of {r0['repeats']} interleaved repeats after "
              f"{res['settings']['warmup']} warm-up run(s). `{cmd}`", "",
              "| | s / batch | images/s | outside the network |", "|---|---|---|---|"]
    for r in rows:
        share = "-" if r["method"] == "network floor" else f"{r['outside_network_pct']:.1f}%"
        lines.append(f"| {r['method']} | {r['seconds_per_batch']:.4g} | {r['images_per_s']:.4g} | {share} |")
    lines += ["", f"Throughput ours / diffusers: **{res['ratio']:.3f}**. The two outputs agree to "
              f"{res['agreement_rel']:.1e} (max abs difference / max abs value: the same chain in "
              f"{r0['dtype']}).", ""]
    if any(r["outside_network_pct"] < 0 for r in rows):
        lines += ["A negative share is timing noise: the floor and the sampler make the same "
                  "network calls, and on a busy machine repeated timings of one thing differ by more "
                  "than the cost outside the network.", ""]
    lines += [
              "*Outside the network* is `1 - floor / time`, the floor being the same number of bare "
              "`unet(x, t).sample` calls; target below 5%. See the script's docstring for what each "
              "row times.", ""]
    return "\n".join(lines)


def write(res: Dict, text: str, stem: str) -> None:
    write_csv(res["rows"], stem + ".csv", columns=list(res["rows"][0]))
    write_text(stem + ".md", text)
    write_json(stem + ".json", res)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", choices=sorted(UNETS), default="ddpm")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny UNet, batch 2, 3 steps, 1 repeat: seconds on a CPU (writes only with --out)")
    p.add_argument("--out", default=None, help=f"output stem (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.smoke:
        args.unet, args.batch, args.steps, args.repeats, args.warmup = "tiny", 2, 3, 1, 1
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args)
    text = report(res, args)
    print(text)
    stem = args.out if args.out is not None else (None if args.smoke else DEFAULT_OUT)
    if stem is not None:
        write(res, text, stem)
    return res


if __name__ == "__main__":
    main()
