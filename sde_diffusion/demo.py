"""``sde-diffusion demo``: the toolkit's main job end to end on an embedded default.

Trains a small score model on two moons (VP SDE), compares the samplers on it from the same starting
noise at several NFE, evaluates the test-set likelihood through the probability-flow ODE, and
writes a report folder (``report.md``, PNG figures, CSV tables).
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["run_demo", "DEMO_SOLVERS"]

#: the samplers the demo compares: ancestral vs non-Markovian, SDE vs ODE, first vs high order
DEMO_SOLVERS = ("ancestral", "reverse_diffusion", "euler_maruyama", "pc", "ddim:eta=0",
                "ddim:eta=1", "ode", "dpm_solver++")


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def run_demo(out: str, iters: Optional[int] = None, n: int = 2000,
             nfes: Sequence[int] = (10, 20, 50, 100, 200), seed: int = 0, quiet: bool = False,
             n_likelihood: int = 500, retrain: bool = False, command: Optional[str] = None,
             bootstrap: int = 30, floor_repeats: int = 10) -> str:
    """Run the demo into the folder ``out``; returns the path of ``report.md``.

    A finished training of the same config in ``out/train`` is reused (an interrupted one is
    resumed) unless ``retrain``; a training of another config there is replaced. The sliced
    Wasserstein distances get a bootstrap standard error over ``bootstrap`` resamples
    (:class:`~sde_diffusion.experiments.SlicedWBootstrap`), and the data-vs-data floor is measured
    at the same sample size ``n`` over ``floor_repeats`` fresh data sets. ``command`` (the command
    line) goes into the report's provenance.

    Runs on one CPU thread (restored afterwards): the 2-D model's small tensors are fastest there,
    and several threads on a busy machine can slow training many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, iters, n, nfes, seed, quiet, n_likelihood, retrain, command,
                         bootstrap, floor_repeats)
    finally:
        torch.set_num_threads(threads)


def _training_plan(workdir: str, config, retrain: bool) -> Tuple[bool, str]:
    """``(resume, message)``: reuse (or resume) the training in ``workdir`` when its checkpoint was
    written with this very config, else train afresh, and say which and why."""
    from .checkpoints import latest_checkpoint, load_checkpoint
    from .config import flatten

    found = latest_checkpoint(workdir) if os.path.isdir(workdir) else None
    if found is None:
        return False, "training"
    if retrain:
        return False, f"training afresh (--retrain; replaces the training in {workdir})"
    try:
        ckpt = load_checkpoint(found, map_location="cpu")
    except Exception as err:  # unreadable: nothing to reuse
        return False, f"training afresh ({found} cannot be read: {err})"
    def plain(config) -> dict:  # JSON turned tuples into lists
        return {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(config).items()}

    saved, wanted = plain(ckpt["config"]), plain(config)
    changed = sorted(k for k in set(saved) | set(wanted)
                     if k != "device" and saved.get(k) != wanted.get(k))
    if changed:
        return False, (f"training afresh (the training in {workdir} used another config: "
                       f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} differ)")
    step, n_iters = int(ckpt["step"]), int(config.training.n_iters)
    if step >= n_iters:
        return True, (f"reusing the finished training in {workdir} ({step} iterations, same "
                      f"config; --retrain to train again)")
    return True, f"resuming the interrupted training in {workdir} at iteration {step}"


def _data_floor(reference: torch.Tensor, n: int, seed: int, repeats: int,
                bootstrap: int) -> Tuple[float, float, float]:
    """Sliced Wasserstein distance from ``repeats`` fresh two-moons sets of ``n`` points to
    ``reference`` (same projections as the sampler table): ``(mean, standard deviation, bootstrap
    standard error of the first set)``. The mean is the floor that no sampler can beat at this
    sample size; the last two calibrate the table's error bars (the actual spread over fresh sets
    against what the bootstrap makes of one set)."""
    from . import data as data_module
    from .experiments import SlicedWBootstrap
    from .metrics import sliced_wasserstein

    gen = torch.Generator().manual_seed(seed + 54321)
    sets = [data_module.get_dataset("moons", n=n, generator=gen).double() for _ in range(repeats)]
    values = torch.tensor([sliced_wasserstein(x, reference,
                                              generator=torch.Generator().manual_seed(seed))
                           for x in sets], dtype=torch.float64)
    se = (SlicedWBootstrap(reference, bootstrap, seed=seed).standard_error(sets[0])
          if bootstrap >= 2 else math.nan)
    return float(values.mean()), float(values.std()) if repeats > 1 else math.nan, se


def _final_loss(workdir: str) -> float:
    """The last loss in the training's log (also when the training was reused)."""
    import csv

    try:
        with open(os.path.join(workdir, "loss_log.csv"), newline="") as fh:
            rows = list(csv.DictReader(fh))
        return float(rows[-1]["loss"])
    except (OSError, KeyError, IndexError, ValueError):
        return math.nan


def _run_demo(out, iters, n, nfes, seed, quiet, n_likelihood, retrain, command, bootstrap,
              floor_repeats) -> str:
    from . import data as data_module
    from .config import apply_overrides, toy_config
    from .experiments import compare_solvers, parse_solver_list
    from .likelihood import log_likelihood
    from .reports import (plot_error_vs_nfe, plot_sample_panels, plot_trajectories, provenance,
                          write_csv, write_markdown_table, write_text)
    from ._files import write_json
    from .samplers import sample
    from .evaluation import evaluate_model, train

    os.makedirs(out, exist_ok=True)
    config = toy_config("moons", "vpsde")
    overrides = {"seed": seed, "device": "cpu"}
    if iters is not None:
        overrides["training.n_iters"] = int(iters)
        overrides["optim.warmup"] = min(int(config.optim.warmup), max(1, int(iters) // 5))
    apply_overrides(config, overrides)

    workdir = os.path.join(out, "train")
    resume, plan = _training_plan(workdir, config, retrain)
    _log(quiet, f"[1/4] {config.model.name.upper()} score model on two moons "
                f"({config.training.n_iters} iterations, VP SDE): {plan}")
    start = time.perf_counter()
    trained = train(config, workdir, quiet=quiet, resume=resume)
    train_s = time.perf_counter() - start
    reused = trained.resumed_from is not None and trained.resumed_from >= trained.step
    model, sde = trained.model, trained.sde
    with torch.no_grad():
        quality = evaluate_model(model, config, n_samples=n, seed=seed)

    _log(quiet, f"[2/4] comparing {len(DEMO_SOLVERS)} samplers at NFE {', '.join(map(str, nfes))}")
    test = data_module.get_dataset("moons", n=n, seed=seed + 12345).double()
    specs = parse_solver_list(",".join(DEMO_SOLVERS))
    model.net.double()
    with torch.no_grad():
        rows = compare_solvers(model, specs, nfes, n, reference=test, seed=seed, keep_samples=True,
                               bootstrap=bootstrap, progress=lambda s: _log(quiet, f"      {s}"))
    floor = _data_floor(test, n, seed, floor_repeats, bootstrap)
    samples = {f"{r['solver']} ({r['nfe']} NFE)": r.pop("samples") for r in rows
               if "samples" in r and (r["nfe_budget"] in (max(nfes), "adaptive"))}
    write_csv(rows, os.path.join(out, "samplers.csv"))
    table = write_markdown_table(rows)
    plot_error_vs_nfe(rows, "sliced_w", os.path.join(out, "sliced_w_vs_nfe.png"),
                      title=f"sliced Wasserstein to {n} test points vs NFE (±1 bootstrap s.e.)",
                      floor=floor[:2], floor_label=f"data vs data, {n} points (±1 s.d.)")
    plot_error_vs_nfe(rows, "flow_rmse", os.path.join(out, "flow_error_vs_nfe.png"),
                      title="deterministic solvers: RMS error to the exact flow map")
    plot_sample_panels(samples, os.path.join(out, "samples.png"), reference=test)
    x_T = sde.prior_sampling((10, 2), generator=torch.Generator().manual_seed(seed + 3),
                             dtype=torch.float64)
    with torch.no_grad():
        paths = {name: sample(model, x_T=x_T, solver=name, steps=100, return_trajectory=True,
                              generator=seed).trajectory
                 for name in ("euler_maruyama", "ode_heun")}
    plot_trajectories({"reverse SDE (Euler–Maruyama)": paths["euler_maruyama"],
                       "probability-flow ODE (Heun)": paths["ode_heun"]},
                      os.path.join(out, "trajectories.png"), reference=test[:1000])

    _log(quiet, f"[3/4] test-set likelihood of {min(n_likelihood, n)} points through the "
                "probability-flow ODE")
    x_test = test[:min(n_likelihood, n)]
    ll = log_likelihood(model, sde, x_test, divergence="exact")
    stats = ll.summary(trim=0.1)
    likelihood_rows = [{"points": stats["n"], "divergence": "exact", "nll_nats": stats["nll_mean"],
                        "nll_median": stats["nll_median"],
                        "nll_trimmed10": stats["nll_trimmed_mean"], "bpd": stats["bpd_mean"],
                        "bpd_ci95": stats["bpd_ci95"], "latent_outliers": stats["latent_outliers"],
                        "nfe": ll.nfe}]
    write_csv(likelihood_rows, os.path.join(out, "likelihood.csv"))

    _log(quiet, "[4/4] writing the report")
    record = provenance(seed=seed, command=command, iterations=int(trained.step),
                        training_reused=reused, samples_per_solver=n, bootstrap_resamples=bootstrap)
    write_json(os.path.join(out, "provenance.json"), record)
    report = _report(config, train_s, trained, reused, plan, _final_loss(workdir), quality, table,
                     floor, n, bootstrap, floor_repeats, likelihood_rows, nfes, record)
    path = write_text(os.path.join(out, "report.md"), report)
    return path


def _report(config, train_s, trained, reused, plan, final_loss, quality, table, floor, n,
            bootstrap, floor_repeats, likelihood_rows, nfes, record) -> str:
    from .reports import write_markdown_table

    if reused:
        how = "the finished training of an earlier run, reused (`--retrain` trains again)"
    else:
        how = f"{train_s:.1f} s on {torch.get_num_threads()} CPU thread(s)"
    floor_mean, floor_sd, floor_se = floor
    outliers = likelihood_rows[0]["latent_outliers"]
    lines = [
        "# sde_diffusion demo: two moons, VP SDE",
        "",
        "## Training",
        "",
        f"- model: {config.model.name} ({sum(p.numel() for p in trained.net.parameters())} parameters), "
        f"parameterization `{config.model.parameterization}`, {trained.step} iterations, "
        f"batch {config.training.batch_size}, {how}",
        f"- final loss: {final_loss:.4g}",
        f"- sample quality ({config.sampling.method}, {config.sampling.steps} steps, {quality['n']} "
        f"samples): sliced Wasserstein to fresh data {quality['sw']:.4g}, between two fresh data "
        f"sets of the same size {quality['sw_baseline']:.4g} (ratio {quality['sw_ratio']:.2f}; 1 is "
        f"perfect; each the mean over {quality['repeats']} fresh sets)",
        "",
        "## Samplers",
        "",
        f"Every solver starts from the same noise `x_T` ({n} samples); stochastic solvers share one "
        "seed. `flow_rmse` is a deterministic solver's RMS distance to the exact flow map of the "
        "trained model (its probability-flow ODE solved at tight tolerance) over the first 256 "
        "samples: pure discretisation error. `sliced_w` is the sliced Wasserstein distance "
        f"(256 directions) to {n} held-out test points: distributional error of any solver, "
        "floored by the model's own error and by the sample size.",
        "",
        f"`sliced_w_se` is its bootstrap standard error: {bootstrap} resamples, with replacement, of "
        "the samples and of the test points (the same resampled indices for every row, on 64 "
        "directions). Two rows whose difference is within about two standard errors are not "
        "told apart by this test set.",
        "",
        f"Floor: a fresh data set of the same size, {n} points, against the same test points gives "
        f"{floor_mean:.4g} ± {floor_sd:.2g} (mean ± standard deviation over {floor_repeats} fresh "
        "sets): a sampler at the floor is as close to the test set as new data are. To calibrate "
        f"the error bars: the bootstrap gives {floor_se:.2g} for the first fresh set, while the "
        f"spread actually seen over fresh sets is {floor_sd:.2g}. Near the floor the bootstrap "
        "tends to overstate the spread (resampled points repeat, which adds distance), so error "
        "bars there are cautious.",
        "",
        table,
        "![sliced Wasserstein vs NFE](sliced_w_vs_nfe.png)",
        "",
        "![flow-map error vs NFE](flow_error_vs_nfe.png)",
        "",
        f"### Samples at {max(nfes)} NFE (blue; orange lines: density contours of the test data)",
        "",
        "![samples per solver](samples.png)",
        "",
        "### Trajectories from the same starting points",
        "",
        "The reverse SDE wanders (ancestral, Markovian noise); the probability-flow ODE follows "
        "smooth, deterministic paths: same marginals, different couplings of noise and data.",
        "",
        "![trajectories](trajectories.png)",
        "",
        "## Likelihood",
        "",
        "Negative log-likelihood of held-out points through the probability-flow ODE (exact "
        "divergence, dopri5 at rtol = atol = 1e-5); bits/dim = nats / (D ln 2) for continuous 2-D "
        "data (no dequantization). `bpd_ci95` is the half-width of the 95% confidence interval of "
        "the mean; `nll_median` and `nll_trimmed10` (the mean without the 10% lowest and highest) "
        "are robust to a few points the model maps far outside the prior; `latent_outliers` "
        "counts those (|x_T|^2 beyond the chi-square quantile 1 - 1e-6 of the prior)"
        + (f": here {outliers}, so prefer the median." if outliers else "."),
        "",
        write_markdown_table(likelihood_rows),
        "## Provenance",
        "",
        *[f"- {key}: `{value}`" for key, value in record.items()],
        "",
        "Data: samplers.csv, likelihood.csv, provenance.json; training log: train/loss_log.csv.",
        "",
    ]
    return "\n".join(lines)
