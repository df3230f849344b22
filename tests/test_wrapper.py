"""The parameterization wrapper: eps / x0 / v / score networks built from the exact oracle convert to
every other view exactly; time inputs; NFE counting; NonFiniteError; validation; dtype/device."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_diffusion import VESDE, VPSDE, random_mixture
from sde_diffusion.models import NonFiniteError, OracleModel, ScoreModel
from sde_diffusion.models.wrapper import PARAMETERIZATIONS, TIME_INPUTS

from helpers import SDES  # noqa: E402

F64 = torch.float64

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROPERTY = settings(derandomize=True, max_examples=25, deadline=None)


def _bcast(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def oracle_net(mixture, sde, parameterization):
    """A 'network' of the given parameterization that is exact: built from the oracle's closed forms.
    It takes continuous time (time_input="t")."""

    def net(x, t):
        if parameterization == "eps":
            return mixture.eps(x, t)
        if parameterization == "x0":
            return mixture.x0(x, t)
        if parameterization == "score":
            return mixture.score(x, t)
        a, s = _bcast(sde.alpha(t), x), _bcast(sde.sigma(t), x)
        return a * mixture.eps(x, t) - s * mixture.x0(x, t)          # v = alpha z - sigma x0

    return net


def _setup(sde_name, event=(2,), n=12, seed=0):
    sde = SDES[sde_name]()
    mix = random_mixture(dim=event, n_components=4, seed=seed, sde=sde, diagonal=True)
    t = torch.linspace(0.02, 1.0, n, dtype=F64) * sde.T
    x = mix.sample(n, t=t, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return sde, mix, x, t


# ---- exact conversions ---------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("sde_name", list(SDES))
def test_each_parameterization_converts_to_every_view_exactly(sde_name, parameterization):
    sde, mix, x, t = _setup(sde_name, event=(2, 2, 2))
    model = ScoreModel(oracle_net(mix, sde, parameterization), sde, parameterization)
    truth = {"eps": mix.eps(x, t), "x0": mix.x0(x, t), "score": mix.score(x, t)}
    for view, expected in truth.items():
        got = getattr(model, view)(x, t)
        assert got.shape == x.shape and got.dtype == F64
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11 * scale,
                                   msg=lambda m: f"{parameterization} -> {view}: {m}")
    # a scalar time is broadcast over the batch
    for view in truth:
        torch.testing.assert_close(getattr(model, view)(x, 0.5), getattr(mix, view)(x, 0.5),
                                   rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_oracle_model_views_are_the_closed_forms(sde_name):
    sde, mix, x, t = _setup(sde_name)
    model = OracleModel(mix)
    assert model.sde is sde and model.parameterization == "score"
    for view in ("eps", "x0", "score"):
        torch.testing.assert_close(getattr(model, view)(x, t), getattr(mix, view)(x, t), rtol=0, atol=0)
    torch.testing.assert_close(model.raw(x, t), mix.score(x, t), rtol=0, atol=0)
    # a mixture without an SDE, or with another one, is diffused by the SDE given here
    other = VESDE(sigma_max=10.0)
    m2 = OracleModel(random_mixture(dim=2, n_components=4, seed=0, diagonal=True), sde=other)
    assert m2.sde is other and m2.mixture.sde is other
    torch.testing.assert_close(m2.score(x, t), mix.with_sde(other).score(x, t), rtol=0, atol=0)


def test_views_are_mutually_consistent_for_any_network():
    """Whatever a network outputs, the three views satisfy x = alpha x0 + sigma eps and
    score = -eps / sigma (the conversions are algebraically exact)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()

    def f(x, t):
        return net(x) * (1 + t[:, None])

    for sde_name in SDES:
        sde = SDES[sde_name]()
        x = torch.randn(6, 3, dtype=F64)
        t = torch.linspace(0.05, 1.0, 6, dtype=F64)
        a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        for p in PARAMETERIZATIONS:
            model = ScoreModel(f, sde, p)
            eps, x0, score = model.eps(x, t), model.x0(x, t), model.score(x, t)
            with torch.no_grad():
                torch.testing.assert_close(a * x0 + s * eps, x, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(score, -eps / s, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(getattr(model, p if p != "v" else "eps")(x, t),
                                           f(x, t) if p != "v" else (s * x + a * f(x, t)) / (a * a + s * s))


def test_the_wrapper_is_differentiable():
    sde = VPSDE()
    net = torch.nn.Linear(2, 2).double()
    model = ScoreModel(lambda x, t: net(x), sde, "v")
    x = torch.randn(4, 2, dtype=F64, requires_grad=True)
    model.score(x, 0.3).sum().backward()
    assert x.grad is not None and net.weight.grad is not None


# ---- time inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("time_input", list(TIME_INPUTS) + ["callable"])
def test_time_input_variants(time_input):
    sde = VPSDE(N=500)
    seen = []

    def net(x, t_in):
        seen.append(t_in)
        return torch.zeros_like(x)

    mapping = (lambda t: 1000.0 * t) if time_input == "callable" else time_input
    model = ScoreModel(net, sde, "eps", time_input=mapping)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    model.eps(torch.zeros(3, 2, dtype=F64), t)
    expected = {"t": t, "sigma": sde.sigma(t), "index": t * 499, "callable": 1000.0 * t}[time_input]
    torch.testing.assert_close(seen[-1], expected, rtol=1e-14, atol=0)
    model.eps(torch.zeros(3, 2, dtype=F64), 0.5)             # scalar times reach the net as (batch,)
    assert seen[-1].shape == (3,)


def test_sigma_time_input_drives_a_sigma_conditioned_network_exactly():
    """An NCSN-style network conditioned on sigma (VE: t recovered from sigma) gives the oracle."""
    sde = VESDE()
    mix = random_mixture(dim=2, n_components=3, seed=1, sde=sde)

    def net(x, sigma):
        t = torch.log(sigma / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
        return mix.score(x, t.clamp(0, 1))

    model = ScoreModel(net, sde, "score", time_input="sigma")
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    x = mix.sample(3, t=t, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(model.eps(x, t), mix.eps(x, t), rtol=1e-9, atol=1e-12)


def test_network_keyword_arguments_pass_through():
    got = {}

    def net(x, t, y=None):
        got["y"] = y
        return x

    model = ScoreModel(net, VPSDE(), "x0")
    labels = torch.tensor([1, 2])
    model.score(torch.zeros(2, 2), 0.5, y=labels)
    assert got["y"] is labels


# ---- NFE counting --------------------------------------------------------------------------------

def test_nfe_counts_network_evaluations_not_samples():
    sde, mix, x, t = _setup("vp")
    for model in (ScoreModel(oracle_net(mix, sde, "eps"), sde, "eps"), OracleModel(mix)):
        assert model.nfe == 0
        model.eps(x, t)
        model.x0(x[:1], t[:1])
        model.score(x, 0.3)
        model.raw(x, t)
        assert model.nfe == 4
        model.reset_nfe()
        assert model.nfe == 0
        model.score(x, t)
        assert model.nfe == 1


# ---- non-finite outputs --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_output_raises_naming_the_time(bad):
    def net(x, t):
        out = torch.zeros_like(x)
        out[2, 1] = bad
        return out

    sde = VPSDE()
    model = ScoreModel(net, sde, "eps")
    x = torch.zeros(4, 3)
    t = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for view in ("eps", "x0", "score", "raw"):
        with pytest.raises(NonFiniteError, match=r"the model returned NaN/Inf at t=0\.3\b") as info:
            getattr(model, view)(x, t)
        assert info.value.t == pytest.approx(0.3) and info.value.step is None
        assert isinstance(info.value, FloatingPointError)
    unchecked = ScoreModel(net, sde, "eps", check_finite=False)
    assert not bool(torch.isfinite(unchecked.eps(x, t)).all())


def test_oracle_model_raises_on_non_finite_output():
    sde, mix, x, t = _setup("ve")
    x = x.clone()
    x[5, 0] = math.nan
    model = OracleModel(mix)
    with pytest.raises(NonFiniteError, match=rf"the oracle returned NaN/Inf at t={t[5].item():.6g}") as info:
        model.score(x, t)
    assert info.value.t == pytest.approx(t[5].item())
    assert not bool(torch.isfinite(OracleModel(mix, check_finite=False).x0(x, t)).all())


def test_non_finite_error_carries_step():
    err = NonFiniteError("boom", t=0.5, step=7)
    assert (err.t, err.step, str(err)) == (0.5, 7, "boom")


# ---- validation ----------------------------------------------------------------------------------

def test_bad_arguments_are_rejected_naming_the_value():
    sde = VPSDE()

    def net(x, t):
        return x

    with pytest.raises(ValueError, match=r"parameterization must be one of .*got 'noise'"):
        ScoreModel(net, sde, "noise")
    with pytest.raises(ValueError, match=r"time_input must be one of .*got 'log_sigma'"):
        ScoreModel(net, sde, time_input="log_sigma")
    with pytest.raises(ValueError, match=r"net must be callable, got NoneType"):
        ScoreModel(None, sde)
    with pytest.raises(ValueError, match=r"sde must be an SDE instance, got 'vp'"):
        ScoreModel(net, "vp")
    with pytest.raises(ValueError, match=r"shaped like x \(4, 2\), got \(4, 3\)"):
        ScoreModel(lambda x, t: torch.zeros(4, 3), sde).eps(torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match=r"shaped like x \(4, 2\), got list"):
        ScoreModel(lambda x, t: [0.0], sde).x0(torch.zeros(4, 2), 0.5)
    model = ScoreModel(net, sde)
    for bad, shown in ((1.5, r"1\.5"), (-0.1, r"-0\.1"), (math.nan, "nan")):
        with pytest.raises(ValueError, match=rf"t must lie in \[0, T=1\.0\], got {shown}"):
            model.score(torch.zeros(2, 2), bad)
    assert model.nfe == 0                                     # rejected calls cost no NFE
    with pytest.raises(ValueError, match=r"OracleModel needs an SDE"):
        OracleModel(random_mixture())


# ---- time checks without a device sync -----------------------------------------------------------

def _linear_net(x, t_in):
    return x * _bcast(t_in, x)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_bad_times_on_cpu_raise_the_same_error_in_every_view(parameterization):
    """Numbers and CPU tensors are range-checked on every call, the message naming the bad entry."""
    model = ScoreModel(_linear_net, VPSDE(), parameterization)
    x = torch.zeros(3, 2)
    for bad, shown in ((1.5, r"1\.5"), (-0.25, r"-0\.25"), (math.nan, "nan")):
        for t in (bad, torch.tensor([0.5, bad, 0.2]), torch.tensor([0.5, bad, 0.2], dtype=F64)):
            for view in ("raw", "eps", "x0", "score"):
                with pytest.raises(ValueError, match=rf"t must lie in \[0, T=1\.0\], got {shown}"):
                    getattr(model, view)(x, t)
    assert model.nfe == 0


def test_device_times_are_not_read_back_but_host_times_are_checked_before_the_copy():
    """On the 'meta' device any read-back (bool, .item()) raises, so it stands in for a GPU: a
    device t goes through every view without one (check_finite=False, which does read back), and a
    number or CPU t is checked on the host before it moves to x's device."""
    sde = VPSDE(N=100)
    x = torch.zeros(3, 2, device="meta")
    t = torch.full((3,), 0.5, device="meta")
    for time_input in TIME_INPUTS:
        for parameterization in PARAMETERIZATIONS:
            model = ScoreModel(_linear_net, sde, parameterization, time_input=time_input,
                               check_finite=False)
            for view in ("raw", "eps", "x0", "score"):
                out = getattr(model, view)(x, t)
                assert out.device.type == "meta" and out.shape == x.shape
            assert model.eps(x, 0.5).device.type == "meta"
    model = ScoreModel(_linear_net, sde, check_finite=False)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\.0\], got 1\.5"):
        model.eps(x, 1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\.0\], got -0\.5"):
        model.x0(x, torch.tensor([0.1, -0.5, 0.2]))
    with pytest.raises(RuntimeError, match="meta"):      # the SDE's own views still check device times
        sde.alpha(t)


@pytest.mark.gpu
@pytest.mark.parametrize("time_input", TIME_INPUTS)
def test_model_calls_on_cuda_do_not_synchronise(time_input):
    sde = VPSDE(N=100)
    x = torch.randn(8, 3, device="cuda")
    t = torch.linspace(0.1, 1.0, 8, device="cuda")
    net = torch.nn.Linear(3, 3).cuda()
    model = ScoreModel(lambda xx, tt: net(xx) * _bcast(tt, xx), sde, "v", time_input=time_input,
                       check_finite=False)
    model.eps(x, t)                                          # warm up (lazy CUDA initialisation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [getattr(model, view)(x, t) for view in ("raw", "eps", "x0", "score")]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(o.is_cuda and o.shape == x.shape for o in outs)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\.0\], got 1\.5"):
        model.eps(x, 1.5)                                    # a number: checked on the host
    with pytest.raises(ValueError, match=r"got 1\.5"):
        sde.alpha(torch.full((8,), 1.5, device="cuda"))      # direct SDE calls still check


# ---- dtype and device ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_dtype_and_device_follow_the_input(parameterization, dtype, device):
    sde, mix, x64, t64 = _setup("vp", n=6)
    model = ScoreModel(oracle_net(mix, sde, parameterization), sde, parameterization)
    x, t = x64.to(device=device, dtype=dtype), t64.to(device=device, dtype=dtype)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for view in ("eps", "x0", "score"):
        out = getattr(model, view)(x, t)
        assert out.dtype == dtype and out.device.type == device
        ref = getattr(mix, view)(x64, t64)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=tol["rtol"],
                                   atol=tol["atol"] * (1 + ref.abs().max().item()))
    oracle = OracleModel(mix)
    assert oracle.eps(x, 0.5).device.type == device and oracle.eps(x, 0.5).dtype == dtype


def _random_mlp(dim=3, seed=0):
    """A float32 TimeMLP with a random (not zero) output layer, as a trained checkpoint would be."""
    from sde_diffusion.models import TimeMLP

    torch.manual_seed(seed)
    net = TimeMLP(dim, hidden=16, depth=1)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return net.eval()


@pytest.mark.parametrize("time_input", TIME_INPUTS)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_float32_network_with_float64_input_returns_float64(parameterization, time_input):
    """A float32 nn.Module gets its input cast to float32 and its output cast back: float64 in,
    float64 out, equal to the float32 computation (and to a float64 copy of the network within
    float32 round-off); the parameterization conversion runs in float64."""
    import copy

    sde = VPSDE(N=100)
    net = _random_mlp()
    x64 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t64 = torch.linspace(0.05, 0.9, 5, dtype=F64)
    model = ScoreModel(net, sde, parameterization, time_input=time_input)
    model64 = ScoreModel(copy.deepcopy(net).double(), sde, parameterization, time_input=time_input)
    with torch.no_grad():
        # what the network computes: float32 input, time input made in float64 then cast
        raw32 = net(x64.float(), model._net_time(t64).float())
        for view in ("raw", "eps", "x0", "score"):
            out = getattr(model, view)(x64, t64)
            assert out.dtype == F64, view
            ref = getattr(model64, view)(x64, t64)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(model.raw(x64, t64), raw32.double(), rtol=0, atol=0)
        # the conversion is done in float64 from the float32 network output, not in float32
        if parameterization == "eps":
            a, s = sde.alpha(t64)[:, None], sde.sigma(t64)[:, None]
            torch.testing.assert_close(model.x0(x64, t64), (x64 - s * raw32.double()) / a,
                                       rtol=1e-14, atol=0)
    # and the other way round: a float64 network on float32 input gives float32
    assert model64.eps(x64.float(), t64.float()).dtype == torch.float32
    assert model.nfe > 0 and model64.nfe > 0


# ---- property-based ------------------------------------------------------------------------------

@PROPERTY
@given(sde_name=st.sampled_from(list(SDES)), parameterization=st.sampled_from(PARAMETERIZATIONS),
       event=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple), batch=st.integers(1, 5),
       seed=st.integers(0, 1000), fracs=st.data())
def test_property_conversions_are_exact(sde_name, parameterization, event, batch, seed, fracs):
    sde = SDES[sde_name]()
    mix = random_mixture(dim=event, n_components=3, seed=seed, sde=sde, diagonal=bool(seed % 2))
    t = torch.tensor(fracs.draw(st.lists(st.floats(0.02, 1.0), min_size=batch, max_size=batch)), dtype=F64)
    x = mix.sample(batch, t=t, generator=torch.Generator().manual_seed(seed), dtype=F64)
    model = ScoreModel(oracle_net(mix, sde, parameterization), sde, parameterization)
    for view in ("eps", "x0", "score"):
        expected = getattr(mix, view)(x, t)
        torch.testing.assert_close(getattr(model, view)(x, t), expected, rtol=1e-8,
                                   atol=1e-10 * (1 + expected.abs().max().item()))
    assert model.nfe == 3


# ---- conditioning: arguments bound to the model ---------------------------------------------------

def _conditional_mlp():
    from sde_diffusion.models import TimeMLP

    torch.manual_seed(0)
    net = TimeMLP(2, hidden=16, depth=1, num_classes=3)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return net.eval()


class _WithLabels(torch.nn.Module):
    """The conditional network with its labels built in (the reference for bind)."""

    def __init__(self, net, labels):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x, t):
        return self.net(x, t, self.labels)


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver++", "unipc", "edm_heun", "dpm_solver_2",
                                    "euler_maruyama", "pc", "sde_dpm_solver++", "ode_heun"])
def test_a_bound_label_reaches_the_network_through_every_solver(solver):
    """model.bind(y=labels) passes the labels on every network call: the samples are those of a
    network with the labels built in, and the NFE is the solver's usual cost."""
    from sde_diffusion import sample
    from sde_diffusion.samplers import get_solver

    sde = VPSDE()
    net = _conditional_mlp()
    model = ScoreModel(net, sde, "eps")
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    kw = dict(shape=(6, 2), solver=solver, steps=4, generator=3, dtype=F64)
    with torch.no_grad():
        got = sample(model.bind(y=labels), **kw)
        built_in = sample(ScoreModel(_WithLabels(net, labels), sde, "eps"), **kw)
        other = sample(model.bind(y=torch.full((6,), 1)), **kw).samples
    torch.testing.assert_close(got.samples, built_in.samples, rtol=0, atol=0)
    assert got.nfe == get_solver(solver).cost(4) == built_in.nfe
    assert not torch.allclose(got.samples[labels != 1], other[labels != 1])
    assert model.nfe == 0, "the bound model counts its own evaluations"


def test_bind_merges_arguments_casts_floats_and_keeps_the_original():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, scale, shift=0.0):
            assert scale.dtype == torch.float32 and x.dtype == torch.float32
            return self.w * x * scale[:, None] + shift

    sde = VPSDE()
    model = ScoreModel(Scaled(), sde, "eps")
    x = torch.ones(2, 3, dtype=F64)
    bound = model.bind(scale=torch.tensor([2.0, 3.0], dtype=F64)).bind(shift=1.0)
    assert model.bound == {} and set(bound.bound) == {"scale", "shift"}
    out = bound.eps(x, 0.5)
    assert out.dtype == F64
    torch.testing.assert_close(out, torch.tensor([[3.0] * 3, [4.0] * 3], dtype=F64))
    torch.testing.assert_close(bound.raw(x, 0.5, shift=0.0), torch.tensor([[2.0] * 3, [3.0] * 3], dtype=F64))
    assert bound.nfe == 2 and model.nfe == 0
    with pytest.raises(TypeError):
        model.eps(x, 0.5)                       # the original has nothing bound


def test_guidance_that_runs_the_network_twice_counts_two_evaluations():
    """A classifier-free-guided model evaluates the network with and without the label through
    raw: every evaluation counts, so a sampler's NFE is twice its steps' cost."""
    from sde_diffusion import sample
    from sde_diffusion.samplers import get_solver

    class Guided(ScoreModel):
        def __init__(self, net, sde, labels, scale):
            super().__init__(net, sde, "eps")
            self.labels, self.null, self.scale = labels, torch.full_like(labels, 3), scale

        def raw(self, x, t, **kwargs):
            cond = super().raw(x, t, y=self.labels)
            uncond = super().raw(x, t, y=self.null)
            return uncond + self.scale * (cond - uncond)

    sde = VPSDE()
    model = Guided(_conditional_mlp(), sde, torch.tensor([0, 1, 2, 0]), 2.0)
    with torch.no_grad():
        out = sample(model, shape=(4, 2), solver="dpm_solver++", steps=5, generator=0)
        assert out.nfe == 2 * get_solver("dpm_solver++").cost(5) == 10
        plain = sample(ScoreModel(model.net, sde, "eps").bind(y=model.labels), shape=(4, 2),
                       solver="dpm_solver++", steps=5, generator=0)
    assert plain.nfe == 5 and not torch.allclose(out.samples, plain.samples)


def test_an_oracle_takes_no_network_arguments():
    sde = VPSDE()
    oracle = OracleModel(random_mixture(2, 3, seed=0, sde=sde))
    with pytest.raises(ValueError, match="takes no network arguments, got y"):
        oracle.bind(y=torch.zeros(2))
    with pytest.raises(ValueError, match="takes no network arguments, got y"):
        oracle.eps(torch.zeros(2, 2), 0.5, y=torch.zeros(2))


# ---- at_scales: a view with the caller's alpha and sigma (issue 18) -------------------------------
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("time_input", ["t", "sigma", "index"])
def test_at_scales_equals_the_views_bit_for_bit_in_float64(parameterization, time_input):
    from sde_diffusion import VESDE, VPSDE
    from sde_diffusion.models import TimeMLP
    for sde in (VPSDE(), VESDE()):
        torch.manual_seed(0)
        net = TimeMLP(2, hidden=8, depth=1).double()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model = ScoreModel(net, sde, parameterization, time_input=time_input)
        x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        t = torch.full((5,), 0.37, dtype=torch.float64)
        _, log_a, log_s = sde.log_scales(torch.tensor([0.37], dtype=torch.float64))
        a, s = float(log_a.exp()), float(log_s.exp())
        with torch.no_grad():
            for view in ("eps", "x0", "score"):
                assert torch.equal(model.at_scales(view, x, t, a, s), getattr(model, view)(x, t)), view
        assert model.nfe == 6


def test_sampling_checks_the_time_once_per_run_not_per_call(monkeypatch):
    """The samplers hand the wrapper the grid's scales: the SDE's time check and scales are not
    evaluated per network call (their number does not grow with the steps)."""
    from sde_diffusion import VPSDE, sample
    from sde_diffusion.models import TimeMLP
    sde = VPSDE()
    model = ScoreModel(TimeMLP(2, hidden=8, depth=1), sde, "eps")
    calls = []
    for name in ("time", "log_scales", "f_g2"):
        orig = getattr(sde, name)
        monkeypatch.setattr(sde, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    counts = {}
    solvers = {"ddim": {}, "dpm_solver++_2m": {}, "unipc": {}, "edm_heun": {}, "euler_maruyama": {},
               "ode_euler": {}, "ode_heun": {}, "ode_rk4": {}, "dpm_solver_2": {}, "dpm_solver_3": {},
               "edm_heun(churn)": {"S_churn": 10.0}, "reverse_diffusion": {}, "ancestral": {}}
    for steps in (5, 20):
        for label, options in solvers.items():
            calls.clear()
            sample(model, x_T=torch.zeros(3, 2), solver=label.split("(")[0], steps=steps, **options)
            counts[label, steps] = len(calls)
    for label in solvers:
        assert counts[label, 20] == counts[label, 5], (label, counts)


def test_at_scales_refuses_an_unknown_view():
    model = ScoreModel(lambda x, t: x, VPSDE(), "eps")
    with pytest.raises(ValueError, match="view must be eps, x0 or score, got 'v'"):
        model.at_scales("v", torch.zeros(2, 1), torch.ones(2), 0.5, 0.5)


def test_at_scales_goes_through_a_subclass_overriding_output():
    """A subclass changing how the network is evaluated in ``_output`` (guidance) is not bypassed
    by the solvers' grid path."""
    from sde_diffusion import VPSDE, sample

    class Doubled(ScoreModel):
        def _output(self, x, t, kwargs, view):
            out, a, s = super()._output(x, t, kwargs, view)
            return 2 * out, a, s
    sde = VPSDE()
    plain = ScoreModel(lambda x, t: 0.1 * x, sde, "eps")
    doubled = Doubled(lambda x, t: 0.1 * x, sde, "eps")
    x, t = torch.ones(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    _, log_a, log_s = sde.log_scales(torch.tensor([0.5], dtype=torch.float64))
    a, s = float(log_a.exp()), float(log_s.exp())
    assert torch.equal(doubled.at_scales("eps", x, t, a, s), 2 * plain.eps(x, t))
    x_T = torch.ones(3, 2, dtype=torch.float64)
    ours = sample(doubled, x_T=x_T, solver="ddim", steps=4).samples
    assert torch.equal(ours, sample(ScoreModel(lambda x, t: 0.2 * x, sde, "eps"), x_T=x_T,
                                    solver="ddim", steps=4).samples)
