"""Training-step benchmark: ``sde_diffusion.training.train`` against a hand-written PyTorch loop on
the same network, batch and device.

Two hand-written baselines:

- ``plain_matched``: what our loop computes per step, written out by hand: a random batch of the
  training set, t ~ U(eps, T), x_t = alpha x0 + sigma z, eps-MSE, backward, gradient clipping,
  Adam, EMA (``torch._foreach_lerp_``);
- ``plain_minimal``: the same without clipping and EMA (the least a training loop does).

Our loop's step time is read from its own log (``elapsed_s`` between the first and the last logged
step, so set-up is excluded; logging, the NaN checks and its periodic checkpoints are included,
as configured). Runs alternate (ours, matched, minimal, ours, ...) ``--repeats`` times to spread
the noise of a shared machine evenly; the table reports the median per-step time of each.

    python benchmarks/train_step.py                   # toy MLP and digits U-Net on CPU
    python benchmarks/train_step.py --device cuda --which unet --steps 500

Writes benchmarks/results/train_step.md and .csv (``--out`` to change).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion.config import apply_overrides, build_sde, digits_config, toy_config  # noqa: E402
from sde_diffusion.models import model_from_config  # noqa: E402
from sde_diffusion.training import load_data, train  # noqa: E402


def make_config(which: str, steps: int, device: str):
    config = toy_config("moons", "vpsde") if which == "mlp" else digits_config("vpsde")
    apply_overrides(config, {"training.n_iters": steps, "training.sample_freq": 0,
                             "training.snapshot_freq": 0, "device": device})
    return config


def ours(config, workdir: str) -> float:
    result = train(config, workdir, quiet=True, resume=False)
    with open(os.path.join(workdir, "loss_log.csv")) as f:
        rows = list(csv.DictReader(f))
    (s0, e0), (s1, e1) = [(int(r["step"]), float(r["elapsed_s"])) for r in (rows[0], rows[-1])]
    assert result.step == int(config.training.n_iters)
    return (e1 - e0) / (s1 - s0)


def plain(config, matched: bool, device: torch.device) -> float:
    """A hand-written loop on the same network and batch; seconds per step after warm-up."""
    torch.manual_seed(int(config.seed))
    data = load_data(config, torch.Generator().manual_seed(1)).to(device)
    sde = build_sde(config)
    net = model_from_config(config, data.shape[1:], sde=sde)[0].to(device)
    ema = [p.detach().clone() for p in net.parameters()]
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=float(config.optim.lr))
    B, n, eps = int(config.training.batch_size), data.shape[0], float(config.training.eps)
    view = (B,) + (1,) * (data.ndim - 1)
    beta_min, beta_max = sde.beta_min, sde.beta_max
    steps, log_freq = int(config.training.n_iters), int(config.training.log_freq)
    first = max(log_freq, steps // 10)
    losses = []
    for step in range(steps):
        if step == first:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x0 = data[torch.randint(0, n, (B,), device=device)]
        t = torch.rand(B, device=device) * (1 - eps) + eps
        log_alpha = -0.25 * t ** 2 * (beta_max - beta_min) - 0.5 * t * beta_min
        alpha = log_alpha.exp().view(view)
        sigma = (1 - (2 * log_alpha).exp()).sqrt().view(view)
        z = torch.randn_like(x0)
        loss = ((net(alpha * x0 + sigma * z, t) - z) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if matched:
            torch.nn.utils.clip_grad_norm_(params, float(config.optim.grad_clip))
        opt.step()
        if matched:
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - 0.999)
        losses.append(loss.detach())
        if (step + 1) % log_freq == 0:
            float(torch.stack(losses).mean())    # one sync per log, as our loop
            losses = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (steps - first)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", default="mlp,unet", help="comma list of mlp, unet")
    p.add_argument("--steps", type=int, default=0, help="steps per run (default: 1000 mlp, 100 unet)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_step"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for which in args.which.split(","):
        steps = args.steps or (1000 if which == "mlp" else 100)
        config = make_config(which, steps, args.device)
        apply_overrides(config, {"training.log_freq": max(1, steps // 20)})
        times = {"ours": [], "plain_matched": [], "plain_minimal": []}
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                times["ours"].append(ours(config, tmp))
            times["plain_matched"].append(plain(config, True, device))
            times["plain_minimal"].append(plain(config, False, device))
            print(which, r, {k: f"{v[-1] * 1e3:.3f} ms" for k, v in times.items()}, flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        nparams = sum(p.numel() for p in model_from_config(
            config, (2,) if which == "mlp" else (1, 8, 8))[0].parameters())
        rows.append({"network": which, "params": nparams, "batch": int(config.training.batch_size),
                     "device": str(device), "threads": torch.get_num_threads(), "steps": steps,
                     "repeats": args.repeats,
                     "ours_ms": med["ours"] * 1e3, "plain_matched_ms": med["plain_matched"] * 1e3,
                     "plain_minimal_ms": med["plain_minimal"] * 1e3,
                     "ratio_vs_matched": med["ours"] / med["plain_matched"],
                     "ratio_vs_minimal": med["ours"] / med["plain_minimal"],
                     "all_ours_ms": " ".join(f"{v * 1e3:.3f}" for v in times["ours"]),
                     "all_matched_ms": " ".join(f"{v * 1e3:.3f}" for v in times["plain_matched"])})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Training-step benchmark", "",
             "Median milliseconds per step (over the repeats) of `sde_diffusion.training.train` "
             "against hand-written loops on the same network, batch and device "
             f"(`python benchmarks/train_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`). "
             "`plain_matched` does the same work (clipping, EMA); `plain_minimal` omits both. "
             "Ratios below 1 mean our loop was faster in this run: the difference is noise.", "",
             "| network | params | batch | device | threads | ours ms | plain matched ms | "
             "plain minimal ms | ours / matched | ours / minimal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['params']} | {r['batch']} | {r['device']} | {r['threads']} | "
                     f"{r['ours_ms']:.3f} | {r['plain_matched_ms']:.3f} | {r['plain_minimal_ms']:.3f} | "
                     f"{r['ratio_vs_matched']:.3f} | {r['ratio_vs_minimal']:.3f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
