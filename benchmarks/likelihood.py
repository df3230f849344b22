"""Likelihood benchmark on the exact oracle: per-sample error of log p_eps(x), NFE and wall time for
the exact and the Hutchinson divergence at several tolerances, and k-diffusion's
``log_likelihood`` on the same data side by side (when it can be imported).

    python benchmarks/likelihood.py                 # default run (~1-3 minutes on 2 cores)
    python benchmarks/likelihood.py --batch 256 --tols 1e-3 1e-4 1e-5 1e-6

Data: ``random_mixture(64, 8, seed=0)`` under the VP SDE (beta 0.1 -> 20), ``--batch`` points drawn
from ``p_eps`` (eps = 1e-3). Truth: the oracle's exact ``log p_eps(x)``.

Two errors per sample, in nats per dimension:

- ``err``: ``|estimate - log p_eps(x)|``. Every method uses the SDE's Gaussian prior for ``x_T``,
  as published numbers do, so this includes the prior's own error
  ``log N(x_T) - log p_T(x_T)`` (about 2e-4 nats/dim here: VP at T = 1 keeps ``alpha_T = 0.0066``).
- ``err_ode``: the error against the value the method would return with an exact ODE solution and an
  exact divergence, ``log p_eps(x) + log q(x_T*) - log p_T(x_T*)`` with the method's own prior ``q``
  and the latent ``x_T*`` of a float64 reference flow (no divergence) at tolerance 1e-10: the error that the
  solver and the divergence estimator make.

k-diffusion (``k_diffusion.sampling.log_likelihood``, dopri5 through torchdiffeq, one Rademacher
probe) works in EDM's variables ``x_e = x / alpha``, ``sigma_e = sigma / alpha``: its denoiser is the
oracle's exact ``E[x0 | x_t]`` at the time whose noise level is ``sigma_e``, its data are
``x / alpha(eps)``, its interval is ``[sigma_e(eps), sigma_e(T)]``, and its result is mapped back with
the Jacobian: ``log p_x(x) = log p_e(x / alpha_eps) - D log alpha_eps``. Its prior
``N(0, sigma_e(T)^2)`` in ``x_e`` is ``N(0, sigma_T^2)`` in ``x``. Torchdiffeq steps past the end of the
interval and interpolates back; the oracle it evaluates there is the same mixture under the same
VP SDE extended to T = 2 (the linear beta continues), so it sees the smooth continuation.

NFE counts network evaluations. Our exact divergence costs one forward pass (one NFE) plus D
backward passes per ODE function evaluation; Hutchinson and k-diffusion one forward plus one
backward pass. Results: benchmarks/results/likelihood.csv and .md.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from peers import load_k_diffusion_sampling as load_peer_sampling  # noqa: E402
from sde_diffusion import VPSDE, random_mixture  # noqa: E402
from sde_diffusion.flow import integrate_flow  # noqa: E402
from sde_diffusion.likelihood import log_likelihood  # noqa: E402
from sde_diffusion.models import OracleModel  # noqa: E402


# ---- k-diffusion ----------------------------------------------------------------------------------
def load_k_diffusion_sampling():
    """k-diffusion's ``sampling`` module (loaded as the sampler benchmark does, see
    ``benchmarks/peers.py``). Returns ``(module, None)`` or ``(None, why)``."""
    try:
        module = load_peer_sampling()
    except Exception as err:  # noqa: BLE001 - any import problem skips the peer
        return None, f"k-diffusion could not be loaded: {type(err).__name__}: {err}"
    if not hasattr(module, "log_likelihood"):
        return None, "this k-diffusion has no sampling.log_likelihood"
    return module, None


def k_diffusion_log_likelihood(kd, mix, sde, x, rtol, atol, seed):
    """k-diffusion's estimate of our ``log p_eps(x)`` (see the module docstring)."""
    ext = VPSDE(beta_min=sde.beta_min, beta_max=sde.beta_max, T=2.0 * sde.T, eps=sde.eps)
    oracle = OracleModel(mix.with_sde(ext))

    def denoiser(x_e, sigma_e):
        t = ext.t_of_lambda(-torch.log(sigma_e.to(torch.float64))).clamp(0.0, ext.T)
        a = ext.alpha(t).to(x_e.dtype)
        return oracle.x0(a.reshape(-1, *([1] * (x_e.ndim - 1))) * x_e, t.to(x_e.dtype))

    a_eps, s_eps = float(sde.alpha(sde.eps)), float(sde.sigma(sde.eps))
    a_T, s_T = float(sde.alpha(sde.T)), float(sde.sigma(sde.T))
    D = x[0].numel()
    torch.manual_seed(seed)                    # k-diffusion draws its probe with the global RNG
    start = time.perf_counter()
    ll_e, info = kd.log_likelihood(denoiser, x / a_eps, s_eps / a_eps, s_T / a_T, atol=atol, rtol=rtol)
    wall = time.perf_counter() - start
    return ll_e - D * math.log(a_eps), oracle.nfe, info["fevals"], wall, s_T ** 2


# ---- the benchmark --------------------------------------------------------------------------------
def normal_logp(z, var):
    d = z[0].numel()
    return -0.5 * d * math.log(2 * math.pi * var) - 0.5 * (z.double() ** 2).reshape(z.shape[0], -1).sum(1) / var


def summarize(name, divergence, tol, est, truth, target, nfe, fevals, wall, D, extra=None):
    err = (est.double() - truth).abs() / D
    err_ode = (est.double() - target).abs() / D
    row = dict(method=name, divergence=divergence, tol=tol, nfe=nfe, fevals=fevals,
               err_mean=err.mean().item(), err_median=err.median().item(), err_max=err.max().item(),
               err_ode_mean=err_ode.mean().item(), err_ode_max=err_ode.max().item(), wall_s=wall)
    row.update(extra or {})
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--no-peer", action="store_true", help="skip k-diffusion")
    p.add_argument("--no-per-sample", action="store_true", help="skip the per-sample solver rows")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these small tensors run fastest on one thread, and "
                        "several threads on a busy machine are many times slower)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "likelihood"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    sde = VPSDE()
    mix = random_mixture(args.dim, args.components, seed=args.seed, sde=sde)
    g = torch.Generator().manual_seed(args.seed + 1)
    x64 = mix.sample(args.batch, t=sde.eps, generator=g, dtype=torch.float64)
    x = x64.to(dtype)
    D = args.dim
    truth = mix.log_prob(x.double(), sde.eps)

    t0 = time.perf_counter()
    # the reference latent: the flow alone (no divergence), float64, tolerance 1e-10
    z_ref, ref_nfe = integrate_flow(OracleModel(mix), sde, x.double(), sde.eps, sde.T, rtol=1e-10,
                                    atol=1e-10)
    log_pT = mix.log_prob(z_ref, sde.T)
    target_ours = truth + sde.prior_logp(z_ref) - log_pT
    prior_gap = ((sde.prior_logp(z_ref) - log_pT).abs() / D).mean().item()
    print(f"reference latent (float64, tol 1e-10): {ref_nfe} NFE, {time.perf_counter() - t0:.1f} s; "
          f"prior gap |log N(x_T) - log p_T(x_T)| = {prior_gap:.1e} nats/dim", flush=True)

    rows = []
    for tol in args.tols:
        for divergence in ("exact", "hutchinson"):
            model = OracleModel(mix)
            r = log_likelihood(model, sde, x, divergence=divergence, rtol=tol, atol=tol,
                               generator=torch.Generator().manual_seed(args.seed + 2))
            rows.append(summarize("sde_diffusion", divergence + ("" if divergence == "exact" else " (1 Rademacher)"),
                                  tol, r.log_likelihood, truth, target_ours, r.nfe,
                                  int(r.n_fevals[0]), r.wall_time, D))
            print(rows[-1], flush=True)
        if not args.no_per_sample:
            r = log_likelihood(OracleModel(mix), sde, x, divergence="exact", rtol=tol, atol=tol,
                               per_sample=True)
            rows.append(summarize("sde_diffusion per-sample", "exact", tol, r.log_likelihood, truth,
                                  target_ours, r.nfe, float(r.n_fevals.double().mean()), r.wall_time, D))
            print(rows[-1], flush=True)

    peer_note = "skipped (--no-peer)"
    if not args.no_peer:
        kd, why = load_k_diffusion_sampling()
        if kd is None:
            peer_note = f"skipped: {why}"
            print(f"k-diffusion {peer_note}", flush=True)
        else:
            peer_note = "k_diffusion.sampling.log_likelihood (one Rademacher probe, dopri5)"
            for tol in args.tols:
                ll, nfe, fevals, wall, var_T = k_diffusion_log_likelihood(kd, mix, sde, x, tol, tol,
                                                                          args.seed + 3)
                target_kd = truth + normal_logp(z_ref, var_T) - log_pT
                rows.append(summarize("k-diffusion", "hutchinson (1 Rademacher)", tol, ll, truth,
                                      target_kd, nfe, fevals, wall, D))
                print(rows[-1], flush=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fields = list(rows[0].keys())
    with open(args.out + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.2e}" if isinstance(v, float) and (abs(v) < 1e-2 or abs(v) >= 1e4) else (
            f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [
        "# Likelihood benchmark (generated by benchmarks/likelihood.py)", "",
        f"Data: `random_mixture({D}, {args.components}, seed={args.seed})` under `VPSDE()`, "
        f"{args.batch} points from p_eps (eps = {sde.eps}), {args.dtype}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.", "",
        "Errors are per sample, in nats per dimension: `err` against the oracle's exact "
        "log p_eps(x) (includes the Gaussian prior's own error at T), `err_ode` against the exact "
        "answer of the ODE with the method's prior (solver + divergence error only; see the "
        "script's docstring). NFE = network evaluations (our exact divergence: one forward + D "
        "backward passes per function evaluation).", "",
        f"Reference latent x_T*: float64 flow, tol 1e-10. Mean prior gap |log N(x_T*) - log p_T(x_T*)| = "
        f"{prior_gap:.1e} nats/dim (the floor of `err` for any method using the Gaussian prior).", "",
        f"Peer: {peer_note}.", "",
        "| method | divergence | rtol=atol | NFE | fevals | err mean | err median | err max | err_ode mean | err_ode max | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) for k in ("method", "divergence", "tol", "nfe", "fevals",
                                                               "err_mean", "err_median", "err_max",
                                                               "err_ode_mean", "err_ode_max", "wall_s")) + " |")
    kd_rows = {r["tol"]: r for r in rows if r["method"] == "k-diffusion"}
    ours = {r["tol"]: r for r in rows if r["method"] == "sde_diffusion" and r["divergence"] == "exact"}
    if kd_rows:
        lines += ["", "Exact divergence vs k-diffusion at equal tolerance:", "",
                  "| rtol=atol | mean err ratio (k-diffusion / ours) | max err ratio | NFE ours | NFE k-diffusion |",
                  "|---|---|---|---|---|"]
        for tol in args.tols:
            if tol in kd_rows and tol in ours:
                a, b = ours[tol], kd_rows[tol]
                lines.append(f"| {tol:g} | {b['err_mean'] / a['err_mean']:.0f}x | "
                             f"{b['err_max'] / a['err_max']:.0f}x | {a['nfe']} | {b['nfe']} |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}.csv and {args.out}.md")


if __name__ == "__main__":
    main()
