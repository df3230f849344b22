"""The samplers the peers ship (issue 15): iPNDM, DEIS, lms, the ancestral DPM-Solver-2 /
DPM-Solver++(2S), dpmpp_sde, dpmpp_3m_sde, SA-Solver and the adaptive DPM-Solver.

- the same method as a peer's: numerically equal to k-diffusion's sampler or diffusers' scheduler
  on the same grid, the same oracle and the same normal draws (skipped when the peer is missing);
- the deterministic ones (and the stochastic ones at eta/tau = 0): convergence order against the
  exact flow map;
- the stochastic ones: per-mode weights, means and variances of p_{t_end};
- NFE accounting, option checks.
Everything is float64 on small oracle mixtures, seeded."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from sde_diffusion import VPSDE, GaussianMixture, sample
from sde_diffusion.metrics import mode_statistics
from sde_diffusion.samplers import available_solvers, make_grid
from sde_diffusion.samplers.reference import mixture_at

from helpers import SDE_CLASSES as SDES  # noqa: E402
from helpers import convergence_slope as _slope  # noqa: E402
from helpers import flow_reference as _reference  # noqa: E402
from helpers import mixture_problem as _problem  # noqa: E402
from helpers import rms as _rms  # noqa: E402

KINDS = list(SDES)
#: VP in the fast run, sub-VP and VE with --runslow (the equality tests cover all three fast)
KINDS_VP_FAST = ["vp"] + [pytest.param(k, marks=pytest.mark.slow) for k in ("subvp", "ve")]
NEW = ["ipndm", "deis", "lms", "dpm_solver_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
       "dpmpp_3m_sde", "sa_solver", "dpm_adaptive"]
PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"


def _max_diff(a, b):
    return float((a - b).abs().max())


# ---- peers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def K():
    """k-diffusion's sampling.py, loaded by benchmarks/peers.py without its heavy dependencies."""
    spec = importlib.util.spec_from_file_location("_peers_for_tests", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        return module.load_k_diffusion_sampling()
    except ImportError as err:
        pytest.skip(f"k-diffusion is not importable: {err}")
    finally:
        sys.modules.pop(spec.name, None)


def _k_run(K, fn, mix, sde, x_T, times, seed=None, **kw):
    """k-diffusion's ``fn`` on our grid: EDM variables ``x/alpha``, noise levels
    ``sigma/alpha``, the oracle's denoiser at the time of each level; normal draws from a
    ``torch.Generator`` seeded like ours."""
    sig = torch.exp(-sde.lambda_(times))
    a = sde.alpha(times)

    def D(x_e, s, **_):
        lam = torch.tensor(-math.log(float(s.reshape(-1)[0])), dtype=torch.float64)
        t = float(sde.t_of_lambda(lam).clamp(sde.eps, sde.T))
        return mix.x0(float(sde.alpha(torch.tensor(t, dtype=torch.float64))) * x_e, t)

    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        kw["noise_sampler"] = lambda s, s_next: torch.randn(x_T.shape, generator=g, dtype=x_T.dtype)
    return getattr(K, fn)(D, x_T / float(a[0]), sig, disable=True, **kw) * float(a[-1])


def _d_run(cls, mix, sde, x_T, times, seed=None, lower_order_final=False, **config):
    """A diffusers multistep scheduler on our grid: its ``sigmas`` are our ``sigma/alpha`` and its
    state is ``x/alpha`` scaled by its own ``1/sqrt(1 + sigma^2)``; the model output is the oracle's
    ``x0`` (``prediction_type="sample"``) at our grid time."""
    sig = torch.exp(-sde.lambda_(times))
    a = sde.alpha(times)
    n = len(times) - 1
    sched = cls(prediction_type="sample", lower_order_final=lower_order_final, **config)
    sched.set_timesteps(n)
    assert len(sched.timesteps) == n
    sched.sigmas = sig.clone()
    ad = 1 / torch.sqrt(1 + sig ** 2)
    x = x_T / a[0] * ad[0]
    kw = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    for i, ts in enumerate(sched.timesteps):
        x = sched.step(mix.x0(x / ad[i] * a[i], float(times[i])), ts, x, **kw).prev_sample
    return x / ad[-1] * a[-1]


K_CASES = [
    # ours, options, k-diffusion's function, its options, seeded
    ("lms", {}, "sample_lms", {}, False),
    ("lms", {"order": 2}, "sample_lms", {"order": 2}, False),
    ("dpm_solver_2_ancestral", {}, "sample_dpm_2_ancestral", {}, True),
    ("dpm_solver_2_ancestral", {"eta": 0.5}, "sample_dpm_2_ancestral", {"eta": 0.5}, True),
    ("dpmpp_2s_ancestral", {}, "sample_dpmpp_2s_ancestral", {}, True),
    ("dpmpp_2s_ancestral", {"eta": 0.3}, "sample_dpmpp_2s_ancestral", {"eta": 0.3}, True),
    ("dpmpp_sde", {"noise": "independent"}, "sample_dpmpp_sde", {}, True),
    ("dpmpp_sde", {"eta": 0.3, "r": 0.4, "noise": "independent"}, "sample_dpmpp_sde",
     {"eta": 0.3, "r": 0.4}, True),
    ("dpmpp_3m_sde", {"d2": "k-diffusion"}, "sample_dpmpp_3m_sde", {}, True),
    ("dpmpp_3m_sde", {"d2": "k-diffusion", "eta": 0.0}, "sample_dpmpp_3m_sde", {"eta": 0.0}, False),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ours,options,theirs,their_options,seeded", K_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in K_CASES])
def test_equals_k_diffusion(K, kind, ours, options, theirs, their_options, seeded):
    sde, mix, x_T = _problem(kind)
    times = make_grid(sde, 10, "karras")
    got = sample(mix, sde, x_T=x_T, solver=ours, grid=times,
                 generator=torch.Generator().manual_seed(5), **options).samples
    ref = _k_run(K, theirs, mix, sde, x_T, times, seed=5 if seeded else None, **their_options)
    assert _max_diff(got, ref) < 1e-12 * float(ref.abs().max()), (ours, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", ["logsnr", "karras"])
def test_deis_logrho_equals_diffusers(kind, grid):
    diffusers = pytest.importorskip("diffusers")
    sde, mix, x_T = _problem(kind)
    times = make_grid(sde, 12, grid)
    for order in (1, 2, 3):
        got = sample(mix, sde, x_T=x_T, solver="deis", grid=times, order=order,
                     variable="logrho").samples
        ref = _d_run(diffusers.DEISMultistepScheduler, mix, sde, x_T, times, solver_order=order)
        assert _max_diff(got, ref) < 1e-12, (kind, grid, order)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_sa_solver_equals_diffusers(kind):
    diffusers = pytest.importorskip("diffusers")
    sde, mix, x_T = _problem(kind)
    times = make_grid(sde, 10, "logsnr")
    for p, c, tau in [(2, 2, 1.0), (3, 4, 1.0), (1, 1, 0.5), (3, 3, 0.0)]:
        for lof in (False, True):
            got = sample(mix, sde, x_T=x_T, solver="sa_solver", grid=times, tau=tau,
                         predictor_order=p, corrector_order=c, weights="diffusers",
                         lower_order_final=lof, generator=torch.Generator().manual_seed(3)).samples
            ref = _d_run(diffusers.SASolverScheduler, mix, sde, x_T, times, seed=3,
                         lower_order_final=lof, predictor_order=p, corrector_order=c,
                         tau_func=lambda t, v=tau: v)
            assert _max_diff(got, ref) < 1e-12, (kind, p, c, tau, lof)


def test_dpm_adaptive_follows_k_diffusion(K):
    """With k-diffusion's controller and one step size for the batch, the same steps as
    ``sample_dpm_adaptive``; k-diffusion computes its log-SNRs in float32 (``torch.tensor`` of
    the end levels), so the agreement is to ~1e-6 and a step decision may flip (the NFE within a
    few), not to round-off."""
    for kind in ("vp", "ve"):
        sde, mix, x_T = _problem(kind)
        ends = torch.tensor([sde.T, sde.eps], dtype=torch.float64)
        sig, a = torch.exp(-sde.lambda_(ends)), sde.alpha(ends)
        for order in (2, 3):
            x, info = K.sample_dpm_adaptive(
                lambda x_e, s, **_: _k_denoise(mix, sde, x_e, s), x_T / float(a[0]),
                float(sig[1]), float(sig[0]), order=order, rtol=1e-3, atol=1e-3, disable=True,
                return_info=True)
            got = sample(mix, sde, x_T=x_T, solver="dpm_adaptive", order=order, rtol=1e-3,
                         atol=1e-3, per_sample=False, controller="k-diffusion")
            assert abs(got.nfe - info["nfe"]) <= 2 * order, (kind, order, got.nfe, info["nfe"])
            assert _max_diff(got.samples, x * float(a[1])) < 5e-4, (kind, order)


def _k_denoise(mix, sde, x_e, s):
    lam = torch.tensor(-math.log(float(s.reshape(-1)[0])), dtype=torch.float64)
    t = float(sde.t_of_lambda(lam).clamp(sde.eps, sde.T))
    return mix.x0(float(sde.alpha(torch.tensor(t, dtype=torch.float64))) * x_e, t)


# ---- equal to our own solvers ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_equivalences_with_existing_solvers(kind):
    sde, mix, x_T = _problem(kind)
    times = make_grid(sde, 9, "karras")
    def run(solver, **kw):
        return sample(mix, sde, x_T=x_T, solver=solver, grid=times, **kw).samples

    ddim = run("ddim")
    scale = float(ddim.abs().max())
    pairs = [
        (run("ddim"), [run("deis", order=1, variable=v) for v in ("t", "logrho", "rho")]
         + [run("ipndm", order=1), run("lms", order=1), run("sa_solver", tau=0.0, predictor_order=1,
                                                            corrector_order=0)]),
        (run("lms", order=3), [run("deis", order=3, variable="rho")]),
        (run("dpm_solver_2"), [run("dpm_solver_2_ancestral", eta=0.0)]),
        (run("dpm_solver++", order=3), [run("dpmpp_3m_sde", eta=0.0)]),
        (run("dpmpp_2s_ancestral", eta=0.0), [run("dpmpp_sde", eta=0.0)]),
        (run("unipc", order=2), [run("sa_solver", tau=0.0, predictor_order=2, corrector_order=3)]),
        (run("unipc", order=3), [run("sa_solver", tau=0.0, predictor_order=3, corrector_order=4)]),
    ]
    for ref, others in pairs:
        for k, other in enumerate(others):
            assert _max_diff(other, ref) < 1e-12 * scale, (kind, k)
    if kind == "ve":   # t is affine in log rho for VE: tAB = log-rho DEIS
        assert _max_diff(run("deis", variable="t"), run("deis", variable="logrho")) < 1e-12 * scale


@pytest.mark.parametrize("kind", ["vp", "subvp"])
def test_deis_time_weights_match_adaptive_quadrature(kind):
    """tAB-DEIS's weights C_ij = int L_j(t) d rho against scipy's adaptive quadrature of
    -e^{-lambda} L_j(t(lambda)) d lambda (pins the Gauss-Legendre panels; for VE, where t is affine
    in lambda, the equivalence with the log-rho weights does)."""
    from scipy.integrate import quad

    from sde_diffusion.models.wrapper import as_model
    from sde_diffusion.samplers.base import SolverContext
    from sde_diffusion.samplers.linear_multistep import multistep_weights

    sde, mix, _ = _problem(kind)
    times = make_grid(sde, 6, "karras")
    ctx = SolverContext(as_model(mix, sde), sde, times, None, torch.float64, torch.device("cpu"), 1)
    lam, ts = ctx.lambdas.tolist(), times.tolist()
    t_of = lambda v: float(sde.t_of_lambda(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
    for i, w in enumerate(multistep_weights(ctx, 3, "t")):
        nodes = [ts[i - j] for j in range(min(3, i + 1))]
        for j, wj in enumerate(w.tolist()):
            def f(v, j=j):
                t, out = t_of(v), 1.0
                for m, tm in enumerate(nodes):
                    if m != j:
                        out *= (t - tm) / (nodes[j] - tm)
                return -math.exp(-v) * out
            exact = quad(f, lam[i], lam[i + 1], epsabs=0, epsrel=1e-12, limit=200)[0]
            assert wj == pytest.approx(exact, rel=1e-10, abs=1e-14), (i, j)


# ---- convergence orders against the exact flow map -------------------------------------------------
ORDER_CASES = [
    # solver, options, grid, steps, expected order, tolerance
    ("ipndm", {}, "karras", [40, 80, 160], 2.0, 0.3),
    ("deis", {"order": 2}, "logsnr", [40, 80, 160], 2.0, 0.3),
    ("deis", {"order": 3}, "logsnr", [80, 160, 320], 3.0, 0.3),
    ("deis", {"order": 3, "variable": "logrho"}, "logsnr", [80, 160, 320], 3.0, 0.3),
    ("lms", {}, "logsnr", [80, 160, 320], 4.0, 0.4),
    ("lms", {"order": 3}, "karras", [80, 160, 320], 3.0, 0.3),
    ("dpm_solver_2_ancestral", {"eta": 0.0}, "logsnr", [40, 80, 160], 2.0, 0.3),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, "logsnr", [40, 80, 160], 2.0, 0.3),
    ("dpmpp_sde", {"eta": 0.0, "r": 0.3}, "logsnr", [40, 80, 160], 2.0, 0.3),
    ("dpmpp_3m_sde", {"eta": 0.0}, "logsnr", [40, 80, 160], 3.0, 0.4),
    ("sa_solver", {"tau": 0.0, "predictor_order": 2, "corrector_order": 0}, "logsnr",
     [40, 80, 160], 2.0, 0.3),
    ("sa_solver", {"tau": 0.0, "predictor_order": 2, "corrector_order": 3}, "logsnr",
     [40, 80, 160], 3.0, 0.5),
]


@pytest.mark.parametrize("kind", KINDS_VP_FAST)
@pytest.mark.parametrize("solver,options,grid,steps,order,tol", ORDER_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES])
def test_convergence_order(kind, solver, options, grid, steps, order, tol):
    sde, mix, x_T, ref = _reference(kind)
    errors = [_rms(sample(mix, sde, x_T=x_T, solver=solver, steps=n, grid=grid,
                          **options).samples, ref) for n in steps]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert abs(_slope(errors, steps) - order) < tol, errors


def test_k_diffusion_3m_weight_is_second_order():
    """k-diffusion's D_2 weight (half the exact one) leaves an O(h^3) local error: order 2,
    where the exact weight gives 3 (the reason for d2="exact" by default)."""
    sde, mix, x_T, ref = _reference("vp")
    steps = [80, 160, 320]
    errors = [_rms(sample(mix, sde, x_T=x_T, solver="dpmpp_3m_sde", steps=n, eta=0.0,
                          d2="k-diffusion").samples, ref) for n in steps]
    assert abs(_slope(errors, steps) - 2.0) < 0.35, errors


@pytest.mark.parametrize("kind", KINDS)
def test_ipndm_equals_diffusers(kind):
    """diffusers' IPNDMScheduler (v-prediction on its own state, equal-step Adams-Bashforth 1-4)
    driven on our grid through its ``alphas``/``betas`` (cos and sin of its angle): ours is the
    same map."""
    diffusers = pytest.importorskip("diffusers")
    sde, mix, x_T = _problem(kind)
    times = make_grid(sde, 10, "karras")
    rho = torch.exp(-sde.lambda_(times))
    a = sde.alpha(times)
    ad = 1 / torch.sqrt(1 + rho ** 2)           # its alpha (cos); its sigma (sin) is rho * ad
    sched = diffusers.IPNDMScheduler()
    sched.set_timesteps(10)
    sched.alphas, sched.betas = ad.clone(), (rho * ad).clone()
    x = x_T / a[0] * ad[0]
    for i, ts in enumerate(sched.timesteps):
        x0 = mix.x0(x / ad[i] * a[i], float(times[i]))
        eps = (x - ad[i] * x0) / (rho[i] * ad[i])
        x = sched.step(ad[i] * eps - rho[i] * ad[i] * x0, ts, x).prev_sample
    ref = x / ad[-1] * a[-1]
    got = sample(mix, sde, x_T=x_T, solver="ipndm", grid=times).samples
    assert _max_diff(got, ref) < 1e-12 * float(ref.abs().max())


# ---- stochastic samplers: statistics of p_{t_end} --------------------------------------------------
def _separated_mixture(sde):
    means = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    return GaussianMixture([0.1, 0.2, 0.3, 0.4], means, [0.08, 0.1, 0.12, 0.1], sde)


def _assert_mode_statistics(samples, target, slack=0.02):
    """Weights, per-mode means and variances within 4.5 standard errors (plus a small slack for
    the discretisation bias)."""
    st = mode_statistics(samples, target)
    n = samples.shape[0]
    w, w_true = st["weights"], st["true_weights"]
    se_w = (w_true * (1 - w_true) / n).sqrt()
    assert bool(((w - w_true).abs() <= 4.5 * se_w + slack).all()), (w, w_true)
    counts = st["counts"]
    se_mean = (st["true_variances"] / counts[:, None]).sqrt()
    assert bool(((st["means"] - st["true_means"]).abs()
                 <= 4.5 * se_mean + slack * st["true_variances"].sqrt()).all()), st["means"]
    ratio = st["variances"] / st["true_variances"]
    se_var = (2.0 / (counts - 1)).sqrt()
    assert bool(((ratio - 1).abs() <= 4.5 * se_var[:, None] + 2 * slack).all()), ratio


STOCHASTIC = [
    ("dpm_solver_2_ancestral", {}, "karras", 50),
    ("dpmpp_2s_ancestral", {}, "karras", 50),
    ("dpmpp_sde", {}, "karras", 50),
    ("dpmpp_3m_sde", {}, "logsnr", 100),
    ("dpmpp_3m_sde", {"eta": 0.5}, "logsnr", 100),
    ("sa_solver", {}, "logsnr", 100),
    ("sa_solver", {"tau": lambda t: float(0.2 <= t <= 0.8), "weights": "diffusers"}, "logsnr", 100),
]


@pytest.mark.parametrize("kind", ["vp", pytest.param("ve", marks=pytest.mark.slow)])
@pytest.mark.parametrize("solver,options,grid,steps", STOCHASTIC,
                         ids=[f"{c[0]}-{sorted(c[1])}" for c in STOCHASTIC])
def test_stochastic_samplers_reproduce_mode_statistics(kind, solver, options, grid, steps):
    sde = SDES[kind]()
    mix = _separated_mixture(sde)
    assert not available_solvers()[solver].is_deterministic(**options)
    out = sample(mix, sde, shape=(4000, 2), solver=solver, steps=steps, grid=grid, generator=11,
                 dtype=torch.float64, **options)
    _assert_mode_statistics(out.samples, mixture_at(mix, sde.eps))


def test_stochastic_samplers_fail_the_statistics_when_the_noise_is_wrong():
    """The statistics test can fail: the same sampler with its state inflated by 5% at every
    step but the last."""
    sde = VPSDE()
    mix = _separated_mixture(sde)
    out = sample(mix, sde, shape=(4000, 2), solver="dpmpp_2s_ancestral", steps=50, generator=11,
                 dtype=torch.float64,
                 correct=lambda step, t, x: x * 1.05 if step < 50 else x)
    with pytest.raises(AssertionError):
        _assert_mode_statistics(out.samples, mixture_at(mix, sde.eps))


def test_dpmpp_sde_needs_brownian_noise():
    """With independent draws for the stage and the step (k-diffusion with a plain noise sampler)
    the variances fall 15-25% short at 50 steps; the Brownian increments (default) pass."""
    sde = VPSDE()
    mix = _separated_mixture(sde)
    out = sample(mix, sde, shape=(4000, 2), solver="dpmpp_sde", steps=50, generator=11,
                 dtype=torch.float64, noise="independent")
    with pytest.raises(AssertionError):
        _assert_mode_statistics(out.samples, mixture_at(mix, sde.eps))


def test_seeds_and_per_sample_noise():
    sde = VPSDE()
    mix = _separated_mixture(sde)
    for solver in ("dpmpp_sde", "dpmpp_3m_sde", "sa_solver", "dpm_solver_2_ancestral"):
        a = sample(mix, sde, shape=(5, 2), solver=solver, steps=8, generator=1).samples
        b = sample(mix, sde, shape=(5, 2), solver=solver, steps=8, generator=1).samples
        c = sample(mix, sde, shape=(5, 2), solver=solver, steps=8, generator=2).samples
        assert torch.equal(a, b) and not torch.equal(a, c), solver
        big = sample(mix, sde, shape=(16, 2), solver=solver, steps=8, generator=4).samples
        small = sample(mix, sde, shape=(8, 2), solver=solver, steps=8, generator=4).samples
        assert torch.allclose(big[:8], small, atol=1e-12), solver


# ---- the adaptive solver ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS_VP_FAST)
def test_dpm_adaptive_error_follows_the_tolerance(kind):
    sde, mix, x_T, ref = _reference(kind)
    errors, nfes = [], []
    for tol in (1e-3, 1e-5):
        stats = {}
        r = sample(mix, sde, x_T=x_T, solver="dpm_adaptive", rtol=tol, atol=tol, stats=stats)
        errors.append(_rms(r.samples, ref))
        nfes.append(r.nfe)
        # the reported NFE is the number of network calls: the slowest sample's count
        assert r.nfe == max(stats["nfe"])
        assert all(n == 3 * (a + j)
                   for n, a, j in zip(stats["nfe"], stats["accepted"], stats["rejected"]))
    assert errors[0] < 5e-3 and errors[1] < 1e-5 and errors[1] < errors[0] / 20, errors
    assert nfes[1] > nfes[0]


def test_dpm_adaptive_controls_every_sample_separately():
    sde, mix, x_T = _problem("vp")
    full = sample(mix, sde, x_T=x_T, solver="dpm_adaptive", rtol=1e-3, atol=1e-3).samples
    for k in (0, 5):
        alone = sample(mix, sde, x_T=x_T[k:k + 1], solver="dpm_adaptive", rtol=1e-3,
                       atol=1e-3).samples
        assert torch.allclose(alone, full[k:k + 1], rtol=0, atol=1e-13), k
    # one step size for the batch: a sample's steps depend on its companions
    batch = sample(mix, sde, x_T=x_T, solver="dpm_adaptive", rtol=1e-3, atol=1e-3,
                   per_sample=False).samples
    alone = sample(mix, sde, x_T=x_T[:1], solver="dpm_adaptive", rtol=1e-3, atol=1e-3,
                   per_sample=False).samples
    assert not torch.allclose(alone, batch[:1], rtol=0, atol=1e-13)
    # it stops at every grid time
    r = sample(mix, sde, x_T=x_T, solver="dpm_adaptive", grid="logsnr", steps=3, rtol=1e-3, atol=1e-3,
               return_trajectory=True)
    assert r.trajectory.shape[0] == 4


# ---- registry, NFE, options ------------------------------------------------------------------------
def test_registered_with_honest_nfe_and_determinism():
    sde, mix, x_T = _problem("vp")
    solvers = available_solvers()
    for name in NEW:
        assert name in solvers, name
    cost = {"ipndm": 1, "deis": 1, "lms": 1, "dpm_solver_2_ancestral": 2, "dpmpp_2s_ancestral": 2,
            "dpmpp_sde": 2, "dpmpp_3m_sde": 1, "sa_solver": 1}
    for name, per_step in cost.items():
        info = solvers[name]
        assert info.cost(7) == 7 * per_step, name
        r = sample(mix, sde, x_T=x_T, solver=name, steps=7, generator=0)
        assert r.nfe == 7 * per_step, name
        r = sample(mix, sde, x_T=x_T, solver=name, nfe=12, generator=0)
        assert r.nfe == 12 and len(r.times) == 12 // per_step + 1, name
    assert solvers["dpm_adaptive"].adaptive and solvers["dpm_adaptive"].is_deterministic()
    for name in ("ipndm", "deis", "lms"):
        assert solvers[name].is_deterministic(), name
    for name, zero in [("dpm_solver_2_ancestral", {"eta": 0.0}), ("dpmpp_2s_ancestral", {"eta": 0.0}),
                       ("dpmpp_sde", {"eta": 0.0}), ("dpmpp_3m_sde", {"eta": 0.0}),
                       ("sa_solver", {"tau": 0.0})]:
        assert not solvers[name].is_deterministic() and solvers[name].is_deterministic(**zero), name
        a = sample(mix, sde, x_T=x_T, solver=name, steps=5, generator=1, **zero).samples
        b = sample(mix, sde, x_T=x_T, solver=name, steps=5, generator=2, **zero).samples
        assert torch.equal(a, b), name


@pytest.mark.parametrize("solver,options,message", [
    ("ipndm", {"order": 5}, "order must be an integer in 1..4, got 5"),
    ("deis", {"variable": "sigma"}, "variable must be one of"),
    ("lms", {"order": 0}, "order must be an integer in 1..4, got 0"),
    ("dpm_solver_2_ancestral", {"eta": 1.5}, r"eta must be a number in \[0, 1\]"),
    ("dpmpp_sde", {"r": 1.0}, r"r must lie in \(0, 1\), got 1.0"),
    ("dpmpp_3m_sde", {"d2": "half"}, "d2 must be 'exact' or 'k-diffusion', got 'half'"),
    ("dpmpp_sde", {"noise": "tree"}, "noise must be 'brownian' or 'independent', got 'tree'"),
    ("sa_solver", {"tau": -1.0}, "tau must be >= 0"),
    ("sa_solver", {"corrector_order": 5}, "corrector_order must be an integer in 0..4, got 5"),
    ("sa_solver", {"weights": "paper"}, "weights must be 'exact' or 'diffusers'"),
    ("dpm_adaptive", {"order": 1}, "order must be 2 or 3, got 1"),
    ("dpm_adaptive", {"rtol": -1.0}, "rtol must be a finite number >= 0, got -1.0"),
    ("dpm_adaptive", {"controller": "pid"}, "controller must be 'paper' or 'k-diffusion'"),
])
def test_bad_options_are_named(solver, options, message):
    sde, mix, x_T = _problem("vp")
    with pytest.raises(ValueError, match=message):
        sample(mix, sde, x_T=x_T, solver=solver, steps=4, **options)


def test_dpm_adaptive_gives_up_after_max_steps():
    sde, mix, x_T = _problem("vp")
    with pytest.raises(RuntimeError, match="max_steps=3"):
        sample(mix, sde, x_T=x_T, solver="dpm_adaptive", rtol=1e-8, atol=1e-8, max_steps=3)
