"""Models from the ecosystem (sde_diffusion.models.adapters), proven against the peers' own samplers.

On a tiny randomly initialised diffusers ``UNet2DModel`` (no download) and on the Gaussian-mixture
oracle, our solvers on the peer's own time points equal:

- diffusers: ``DDIMScheduler`` (eta 0 and eta 1 with the same generator), ``DDPMScheduler``
  (``fixed_large``: our ``ancestral``; ``fixed_small``: our ``ddim`` with eta 1),
  ``DPMSolverMultistepScheduler`` (2M, midpoint; default linspace and Karras sigmas);
- k-diffusion: ``sample_heun`` and ``sample_dpmpp_2m`` on the same sigmas, under EDM's
  ``sigma(t) = t``, under VP, and with diffusers' UNet through k-diffusion's own
  ``DiscreteEpsDDPMDenoiser`` (its log-sigma interpolation of timesteps is ours).

How a peer's run maps to ours: a scheduler's timestep ``k`` is the time ``(k + 1) / N`` of
``DiscreteVPSDE`` (``sde.time_of_timestep``); a final step to clean data (alpha = 1, or sigma = 0)
is ``sample(..., denoise=True)``; k-diffusion's sigmas are the times of ``EDMSDE``
(``times_of_sigmas``). diffusers' DDIM/DDPM keep their tables in float32: the float64 tests lift
``alphas_cumprod`` to float64 (the same values) so that the comparison is at float64 round-off;
``DPMSolverMultistepScheduler`` computes every step in float32 (it casts the sample), so it is
compared at float32 round-off. Where a peer differs on purpose, a test documents it.

Skipped only when diffusers (or k-diffusion, for those tests) is missing.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

import sde_diffusion as sd
from sde_diffusion.models.adapters import (DiscreteVPSDE, EDMSDE, diffusers_alphas_cumprod,
                                           from_diffusers, from_k_diffusion, load_k_diffusion,
                                           times_of_sigmas)

try:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
except ImportError:      # the tests of k-diffusion-style denoisers and EDMSDE run without it
    UNet2DModel = None
needs_diffusers = pytest.mark.skipif(UNet2DModel is None, reason="needs diffusers, the 'ecosystem' "
                                     "extra: pip install \"sde_diffusion[ecosystem]\"")

N_CLASSES = 3


def _unet(dtype=torch.float64) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=N_CLASSES)
    return unet.to(dtype).eval()


@pytest.fixture(scope="module")
def unet():
    if UNet2DModel is None:
        pytest.skip("needs diffusers")
    return _unet()


def _x_T(batch=3, dtype=torch.float64, seed=1):
    return torch.randn((batch, 2, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _lift(sched):
    """The scheduler's float32 tables as float64 (the same values), so that its arithmetic runs in
    float64 like ours."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return sched


@torch.no_grad()
def _pipeline(unet, sched, x, labels=None, eta=None, generator=None):
    """diffusers' pipeline loop: the network at every scheduler timestep, then ``step``."""
    for ts in sched.timesteps:
        out = unet(x, ts, class_labels=labels).sample
        kw = {} if eta is None else {"eta": eta}
        if generator is not None:
            kw["generator"] = generator
        x = sched.step(out, ts, x, **kw).prev_sample
    return x


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- the schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)])
@needs_diffusers
def test_schedule_equals_diffusers_bit_for_bit_and_alpha_sigma_at_trained_timesteps(kw):
    sched = DDPMScheduler(**kw)
    acp = diffusers_alphas_cumprod(dict(sched.config))          # from the config alone
    assert torch.equal(acp, sched.alphas_cumprod.double())
    sde = DiscreteVPSDE(acp)
    t = sde.time_of_timestep(torch.arange(sde.N))
    assert float((sde.alpha(t) ** 2 - acp).abs().max()) < 1e-15
    assert float((sde.sigma(t) ** 2 - (1 - acp)).abs().max()) < 1e-15
    assert sde.eps == pytest.approx(1 / sde.N) and float(sde.sigma(torch.tensor(0.0))) == 0.0
    # log-sigma interpolation between trained timesteps (k-diffusion's t_to_sigma), and its inverse
    k = torch.tensor([0.25, 10.5, sde.N - 1.75], dtype=torch.float64)
    log_s = 0.5 * (torch.log1p(-acp) - acp.log())
    want = torch.lerp(log_s[k.floor().long()], log_s[k.ceil().long()], k.frac())
    assert torch.allclose(-sde.lambda_(sde.time_of_timestep(k)), want, rtol=0, atol=1e-13)
    tt = torch.linspace(1e-5, 1.0, 301, dtype=torch.float64)
    assert float((sde.t_of_lambda(sde.lambda_(tt)) - tt).abs().max()) < 1e-13
    # drift and diffusion: f = d log alpha / dt, g^2 = d sigma^2/dt - 2 f sigma^2 (central differences)
    t0 = torch.tensor([0.3 / sde.N, 0.2003, 0.6517], dtype=torch.float64)
    h = 1e-7
    f, g2 = sde.f_g2(t0)
    assert torch.allclose(f, (sde.log_alpha(t0 + h) - sde.log_alpha(t0 - h)) / (2 * h), rtol=1e-6)
    s2 = lambda u: sde.sigma(u) ** 2  # noqa: E731
    assert torch.allclose(g2, (s2(t0 + h) - s2(t0 - h)) / (2 * h) - 2 * f * s2(t0), rtol=1e-6)


@needs_diffusers
def test_timestep_passed_as_float_interpolated_or_quantised(unet):
    seen = []

    def spy(x, timestep, class_labels=None):
        seen.append(timestep)
        return torch.zeros_like(x)

    sched = DDPMScheduler()
    x = _x_T(2)
    for quantize, want in ((False, 499.7), (True, 500.0)):
        model = from_diffusers(spy, sched, quantize=quantize)
        model.eps(x, (499.7 + 1) / 1000)
        assert seen[-1].dtype == torch.float64 and seen[-1].tolist() == pytest.approx([want, want], abs=1e-12)
    model = from_diffusers(spy, sched)
    model.eps(x.float(), torch.full((2,), 0.1, dtype=torch.float32))        # timestep 99 in float32
    assert seen[-1].tolist() == [99.0, 99.0]
    model.eps(x, 0.5 / 1000)                                                 # below timestep 0
    assert seen[-1].tolist() == [0.0, 0.0]


@needs_diffusers
@torch.no_grad()
def test_class_labels_go_through_bind(unet):
    sched = DDPMScheduler()
    model = from_diffusers(unet, sched)
    x, labels = _x_T(3), torch.tensor([0, 2, 1])
    t = (400 + 1) / 1000
    want = unet(x, torch.tensor(400.0, dtype=torch.float64), class_labels=labels).sample
    got = model.bind(y=labels).eps(x, t)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    other = model.bind(y=torch.tensor([1, 0, 2])).eps(x, t)
    assert float((other - want).abs().max()) > 1e-3


# ---- diffusers: DDIM -----------------------------------------------------------------------------------
@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_trailing(unet, prediction_type, eta):
    """trailing spacing, 10 steps: timesteps 999, 899, ..., 99, then the step to timestep 0
    (``set_alpha_to_one=False``): our DDIM on exactly those 11 times, the same generator."""
    sched = _lift(DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False,
                                prediction_type=prediction_type))
    sched.set_timesteps(10)
    labels = torch.tensor([0, 1, 2])
    x_T = _x_T()
    theirs = _pipeline(unet, sched, x_T, labels, eta=eta, generator=torch.Generator().manual_seed(5))
    model = from_diffusers(unet, sched).bind(y=labels)
    grid = model.sde.time_of_timestep(torch.cat([sched.timesteps, torch.tensor([0])]))
    ours = sd.sample(model, x_T=x_T, solver="ddim", grid=grid, eta=eta,
                     generator=torch.Generator().manual_seed(5))
    assert ours.nfe == 10
    assert _rel(ours.samples, theirs) < 1e-13


@needs_diffusers
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_ddim_leading_final_alpha_one(unet, eta):
    """Stable Diffusion's settings: leading spacing with steps_offset=1 (901, 801, ..., 1) and
    ``set_alpha_to_one=True``: the last step goes to alpha = 1, i.e. to the denoised
    ``x0`` -- our ``denoise=True`` after the grid of the 10 timesteps."""
    sched = _lift(DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True,
                                clip_sample=False))
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == list(range(901, 0, -100))
    x_T = _x_T()
    theirs = _pipeline(unet, sched, x_T, torch.tensor([1, 1, 0]), eta=eta,
                       generator=torch.Generator().manual_seed(3))
    model = from_diffusers(unet, sched).bind(y=torch.tensor([1, 1, 0]))
    ours = sd.sample(model, x_T=x_T, solver="ddim", grid=model.sde.time_of_timestep(sched.timesteps),
                     eta=eta, denoise=True, generator=torch.Generator().manual_seed(3))
    assert _rel(ours.samples, theirs) < 1e-13


@needs_diffusers
def test_ddim_as_shipped_float32(unet):
    """Unchanged float32 scheduler and network: equal at float32 round-off."""
    unet32 = _unet(torch.float32)
    sched = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(20)
    x_T = _x_T(dtype=torch.float32)
    labels = torch.tensor([2, 0, 1])
    theirs = _pipeline(unet32, sched, x_T, labels, eta=0.0)
    model = from_diffusers(unet32, sched).bind(y=labels)
    grid = model.sde.time_of_timestep(torch.cat([sched.timesteps, torch.tensor([0])]))
    ours = sd.sample(model, x_T=x_T, solver="ddim", grid=grid)
    assert _rel(ours.samples, theirs) < 5e-6


@needs_diffusers
def test_ddim_spacing_off_by_one_is_documented_not_hidden(unet):
    """diffusers' DDIM steps from timestep k to ``k - N // steps`` whatever its timestep list says.
    With ``linspace`` spacing (999, 888, ..., 111, 0 for 10 steps) the state reaches the noise
    level of 899 and the next model call is told it is at 888: the chain is not a discretisation
    on any one grid, so no solver on a time grid reproduces it. On its timesteps our DDIM differs
    from it by far more than round-off; with a consistent spacing (trailing, above) they agree."""
    sched = _lift(DDIMScheduler(timestep_spacing="linspace", set_alpha_to_one=False, clip_sample=False))
    sched.set_timesteps(10)
    ts = sched.timesteps.tolist()
    assert ts[:3] == [999, 888, 777]
    targets = [k - 1000 // 10 for k in ts[:-1]]
    assert targets != ts[1:]                                       # 899 is stepped to, 888 evaluated
    x_T = _x_T()
    theirs = _pipeline(unet, sched, x_T, torch.tensor([0, 0, 0]), eta=0.0)
    model = from_diffusers(unet, sched).bind(y=torch.tensor([0, 0, 0]))
    ours = sd.sample(model, x_T=x_T, solver="ddim", grid=model.sde.time_of_timestep(ts))
    assert _rel(ours.samples, theirs) > 1e-3


# ---- diffusers: DDPM -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type, solver, options", [("fixed_large", "ancestral", {}),
                                                            ("fixed_small", "ddim", {"eta": 1.0})])
@needs_diffusers
def test_ancestral_equals_diffusers_ddpm(unet, variance_type, solver, options):
    """DDPMScheduler (10 steps, 900, 800, ..., 0; the last to clean data without noise):
    ``fixed_large`` (variance beta) is our ``ancestral``; ``fixed_small`` (the posterior variance
    beta~) is our ``ddim`` with eta 1; both end with ``denoise=True``. The same generator: both
    draw one normal tensor per step but the last."""
    sched = _lift(DDPMScheduler(variance_type=variance_type, clip_sample=False))
    sched.set_timesteps(10)
    labels = torch.tensor([2, 2, 1])
    x_T = _x_T()
    theirs = _pipeline(unet, sched, x_T, labels, generator=torch.Generator().manual_seed(7))
    model = from_diffusers(unet, sched).bind(y=labels)
    ours = sd.sample(model, x_T=x_T, solver=solver, grid=model.sde.time_of_timestep(sched.timesteps),
                     denoise=True, generator=torch.Generator().manual_seed(7), **options)
    assert _rel(ours.samples, theirs) < 1e-13
    other = sd.sample(model, x_T=x_T, solver=solver, grid=model.sde.time_of_timestep(sched.timesteps),
                      denoise=True, generator=torch.Generator().manual_seed(8), **options)
    assert _rel(other.samples, theirs) > 1e-2                      # the noise matters


@needs_diffusers
def test_ancestral_equals_diffusers_ddpm_on_the_oracle():
    sched = _lift(DDPMScheduler(variance_type="fixed_large", clip_sample=False, beta_schedule="squaredcos_cap_v2"))
    sched.set_timesteps(25)
    sde = DiscreteVPSDE(diffusers_alphas_cumprod(sched))
    mixture = sd.random_mixture(dim=(2, 4, 4), n_components=4, sde=sde)
    oracle = sd.OracleModel(mixture)
    x_T = _x_T(4, seed=2)[:, :, :4, :4].contiguous()
    x, g = x_T, torch.Generator().manual_seed(11)
    for ts in sched.timesteps:
        eps = mixture.eps(x, sde.time_of_timestep(ts).expand(len(x)))
        x = sched.step(eps, ts, x, generator=g).prev_sample
    ours = sd.sample(oracle, x_T=x_T, solver="ancestral", grid=sde.time_of_timestep(sched.timesteps),
                     denoise=True, generator=torch.Generator().manual_seed(11))
    assert _rel(ours.samples, x) < 1e-13


# ---- diffusers: DPM-Solver++(2M) ---------------------------------------------------------------------
@needs_diffusers
@pytest.mark.parametrize("final", ["sigma_min", "zero"])
def test_dpm_solver_pp_2m_equals_diffusers_multistep(final):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final, 10 steps of
    linspace timesteps 999, 899, ..., 100). ``final_sigmas_type="sigma_min"``: the last step ends
    at timestep 0 with first order (fewer than 15 steps): our grid plus timestep 0 with
    ``lower_order_final=True``. ``"zero"``: the last step goes to clean data with first order, i.e.
    to ``x0``: our grid of the 10 timesteps, second order throughout, then ``denoise=True``. The
    scheduler computes in float32 (it casts the sample): float32 round-off."""
    unet32 = _unet(torch.float32)
    sched = DPMSolverMultistepScheduler(final_sigmas_type=final)
    sched.set_timesteps(10)
    x_T = _x_T(dtype=torch.float32)
    labels = torch.tensor([0, 1, 2])
    theirs = _pipeline(unet32, sched, x_T, labels)
    model = from_diffusers(unet32, sched).bind(y=labels)
    ts = sched.timesteps
    if final == "sigma_min":
        grid, opts = model.sde.time_of_timestep(torch.cat([ts, torch.tensor([0])])), dict(lower_order_final=True)
    else:
        grid, opts = model.sde.time_of_timestep(ts), dict(lower_order_final=False, denoise=True)
    ours = sd.sample(model, x_T=x_T.double(), solver="dpm_solver++_2m", grid=grid,
                     solver_type="midpoint", **opts)
    assert ours.nfe == 10
    assert _rel(ours.samples, theirs.double()) < 5e-6
    taylor = sd.sample(model, x_T=x_T.double(), solver="dpm_solver++_2m", grid=grid, **opts)
    assert _rel(taylor.samples, theirs.double()) > 1e-3            # the options matter


@needs_diffusers
def test_dpm_solver_pp_2m_equals_diffusers_karras_sigmas_with_quantised_timesteps():
    """With ``use_karras_sigmas=True`` diffusers steps on Karras noise levels but calls the network
    at the *rounded* timestep of each: our ``quantize=True`` (alpha and sigma of the exact level,
    the nearest trained timestep for the network)."""
    unet32 = _unet(torch.float32)
    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    sched.set_timesteps(12)
    x_T = _x_T(dtype=torch.float32)
    labels = torch.tensor([1, 0, 1])
    theirs = _pipeline(unet32, sched, x_T * float(sched.init_noise_sigma), labels)
    model = from_diffusers(unet32, sched, quantize=True).bind(y=labels)
    grid = times_of_sigmas(model.sde, sched.sigmas[:-1].double())
    ours = sd.sample(model, x_T=x_T.double(), solver="dpm_solver++_2m", grid=grid, solver_type="midpoint",
                     denoise=True)
    assert _rel(ours.samples, theirs.double()) < 5e-6
    interpolated = from_diffusers(unet32, sched).bind(y=labels)
    other = sd.sample(interpolated, x_T=x_T.double(), solver="dpm_solver++_2m", grid=grid,
                      solver_type="midpoint", denoise=True)
    assert _rel(other.samples, theirs.double()) > 1e-4


# ---- k-diffusion -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def K():
    try:
        return load_k_diffusion("sampling")
    except ImportError as err:
        pytest.skip(str(err))


def _karras(K, n, s_min, s_max):
    return K.get_sigmas_karras(n, s_min, s_max, rho=7.0).double()


@pytest.mark.parametrize("solver, peer", [("edm_heun", "sample_heun"), ("dpm_solver++_2m", "sample_dpmpp_2m")])
def test_edm_samplers_equal_k_diffusion_on_the_oracle(K, solver, peer):
    """k-diffusion's sigmas (Karras rho=7, 12 levels, then 0) under EDM's sigma(t) = t: the grid
    is the sigmas without the final 0, the step to 0 is ``denoise=True``."""
    sde = EDMSDE(0.002, 80.0)
    mixture = sd.random_mixture(dim=6, n_components=5, sde=sde)
    D = lambda x, sigma: mixture.x0(x, sigma)  # noqa: E731  -- t = sigma
    sigmas = _karras(K, 12, 0.002, 80.0)
    x_T = torch.randn(64, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 80.0
    theirs = getattr(K, peer)(D, x_T, sigmas, disable=True)
    model = from_k_diffusion(D, sigma_min=0.002, sigma_max=80.0)
    opts = dict(solver_type="midpoint") if solver.startswith("dpm") else {}
    ours = sd.sample(model, x_T=x_T, solver=solver, grid=times_of_sigmas(sde, sigmas[:-1]), denoise=True,
                     **opts)
    assert _rel(ours.samples, theirs) < 1e-13
    exact = sd.sample(sd.OracleModel(mixture), x_T=x_T, solver=solver, grid=sigmas[:-1], denoise=True, **opts)
    assert _rel(exact.samples, theirs) < 1e-12                      # no adapter: the oracle itself


@pytest.mark.parametrize("solver, peer", [("edm_heun", "sample_heun"), ("dpm_solver++_2m", "sample_dpmpp_2m")])
def test_k_diffusion_denoiser_under_vp(K, solver, peer):
    """The same denoiser as a VP model (``sde=VPSDE()``): our solvers run in ``x = alpha x_e`` on the
    times of the same sigmas and land on k-diffusion's result times ``alpha(t_end)``."""
    vp = sd.VPSDE()
    edm = EDMSDE(1e-3, 200.0)
    mixture = sd.random_mixture(dim=4, n_components=3, sde=edm)
    D = lambda x, sigma: mixture.x0(x, sigma)  # noqa: E731
    s_max = float(torch.exp(-vp.lambda_(torch.tensor(1.0, dtype=torch.float64))))
    s_min = float(torch.exp(-vp.lambda_(torch.tensor(vp.eps, dtype=torch.float64))))
    # ends at s_min, not at 0; k-diffusion's float32 ramp can round sigma_max above the VP's
    sigmas = _karras(K, 10, s_min, s_max)[:-1].clamp(max=s_max)
    x_e = torch.randn(32, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * s_max
    theirs = getattr(K, peer)(D, x_e, sigmas, disable=True)
    grid = times_of_sigmas(vp, sigmas)
    a0, a1 = (float(vp.alpha(grid[i])) for i in (0, -1))
    opts = dict(solver_type="midpoint") if solver.startswith("dpm") else {}
    ours = sd.sample(from_k_diffusion(D, sde=vp), x_T=x_e * a0, solver=solver, grid=grid, **opts)
    assert _rel(ours.samples / a1, theirs) < 1e-13


@needs_diffusers
@pytest.mark.parametrize("quantize", [False, True])
def test_diffusers_unet_equals_k_diffusion_discrete_eps_denoiser(K, unet, quantize):
    """k-diffusion's own wrapper of a DDPM eps-model (``DiscreteEpsDDPMDenoiser``: sigma -> the
    fractional timestep by interpolation in log-sigma, or the nearest with ``quantize``) and
    ``sample_heun`` on Karras sigmas between the schedule's ends, against ``from_diffusers`` and
    our EDM Heun on the same sigmas: the two conventions are one."""
    external = load_k_diffusion("external")
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    acp = sched.alphas_cumprod.double()
    labels = torch.tensor([2, 1, 0])
    inner = lambda x, t: unet(x, t, class_labels=labels).sample  # noqa: E731
    wrapped = external.DiscreteEpsDDPMDenoiser(inner, acp, quantize=quantize)
    sigmas = _karras(K, 9, float(wrapped.sigma_min), float(wrapped.sigma_max))
    x_e = _x_T() * float(sigmas[0])
    with torch.no_grad():
        theirs = K.sample_heun(wrapped, x_e, sigmas, disable=True)
    model = from_diffusers(unet, sched, quantize=quantize).bind(y=labels)
    grid = times_of_sigmas(model.sde, sigmas[:-1])
    a0 = float(model.sde.alpha(grid[0]))
    ours = sd.sample(model, x_T=x_e * a0, solver="edm_heun", grid=grid, denoise=True)
    assert _rel(ours.samples, theirs) < 1e-13


def test_edm_sde_likelihood_equals_the_oracle_density():
    """EDMSDE's drift and diffusion (f = 0, g^2 = 2t) carry the oracle's marginals: the
    probability-flow log-likelihood equals the mixture's exact log-density at eps."""
    sde = EDMSDE(0.002, 80.0)
    mixture = sd.random_mixture(dim=3, n_components=3, sde=sde)
    x = mixture.sample(8, t=sde.eps, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = sd.log_likelihood(sd.OracleModel(mixture), None, x, divergence="exact", rtol=1e-8, atol=1e-8,
                               prior_logp=lambda z: mixture.log_prob(z, sde.T))
    assert float((result.log_likelihood - mixture.log_prob(x, sde.eps)).abs().max()) < 1e-5


# ---- EDM preconditioning and errors ------------------------------------------------------------------
def test_edm_preconditioning_formula():
    """sigma_data: D = c_skip x + c_out F(c_in x, c_noise(sigma)) (Karras et al. 2022, Table 1)."""
    seen = {}

    def F(x, noise):
        seen["x"], seen["noise"] = x, noise
        return torch.full_like(x, 2.0)

    sd_ = 0.5
    model = from_k_diffusion(F, sigma_data=sd_, c_noise=lambda s: s.log() / 4)
    x = torch.ones(2, 3, dtype=torch.float64)
    sigma = 1.5
    out = model.x0(x, sigma)
    s2 = sigma ** 2 + sd_ ** 2
    assert torch.allclose(seen["x"], x / math.sqrt(s2))
    assert torch.allclose(seen["noise"], torch.full((2,), math.log(sigma) / 4, dtype=torch.float64))
    assert torch.allclose(out, torch.full_like(x, sd_ ** 2 / s2 + 2.0 * sigma * sd_ / math.sqrt(s2)))


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        from_diffusers(lambda x, t: x, {"prediction_type": "flow"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        from_diffusers(lambda x, t: x, {"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="beta_schedule 'exp' is not supported"):
        from_diffusers(lambda x, t: x, {"beta_schedule": "exp"})
    with pytest.raises(ValueError, match="final sigma of 0"):
        times_of_sigmas(EDMSDE(), torch.tensor([1.0, 0.0]))
    if UNet2DModel is not None:
        learned = _unet()
        learned.register_to_config(time_embedding_type="learned")
        with pytest.raises(ValueError, match="quantize=True"):
            from_diffusers(learned, {})
    monkeypatch.setitem(sys.modules, "k_diffusion", None)
    with pytest.raises(ImportError, match="pip install k-diffusion --no-deps"):
        load_k_diffusion("sampling")


@needs_diffusers
def test_docs_models_diffusers_examples_run(tmp_path, monkeypatch):
    """docs/models.md's blocks that need diffusers (```python no-run diffusers: the plain docs test
    skips them, since the 'ecosystem' extra may be missing) run here."""
    from pathlib import Path

    from markdown_blocks import fenced_blocks

    doc = Path(__file__).resolve().parents[1] / "docs" / "models.md"
    blocks = [f for f in fenced_blocks(doc.read_text(encoding="utf-8"))
              if f.lang == "python" and "diffusers" in f.words[1:]]
    assert blocks
    monkeypatch.chdir(tmp_path)
    for f in blocks:
        exec(compile("\n" * (f.line - 1) + f.code, str(doc), "exec"), {"__name__": "__doc_models__"})
