"""solve_inverse: argument checks with clear errors, observation batching, NFE counted by the model
wrapper, seeded samples that do not depend on the batch size, and the method registry."""
import pytest
import torch

import sde_diffusion
from sde_diffusion import VPSDE, random_mixture, solve_inverse
from sde_diffusion.inverse import (BlockAverage, Colorization, LinearOperator, Mask, MethodResult,
                                   available_methods, get_method, half_mask, register_method)
from sde_diffusion.inverse.registry import METHODS

PRIOR = random_mixture(4, 3, seed=0, sde=VPSDE())
OP = Mask(half_mask((4,)))
Y = torch.tensor([0.1, -0.2], dtype=torch.float64)
MINE = ["score_sde", "ddnm", "ddnm_plus", "repaint", "sdedit"]


def test_exports_and_registry():
    for name in ("solve_inverse", "Mask", "Colorization", "BlockAverage", "Dense", "LinearOperator",
                 "observe", "exact_posterior"):
        assert hasattr(sde_diffusion, name) and name in sde_diffusion.__all__
    for name in MINE:
        assert name in available_methods() and get_method(name).summary
    assert get_method("score_sde").uses_solver and not get_method("repaint").uses_solver
    assert "jump_length" in get_method("repaint").defaults()


def test_errors_name_the_bad_value_and_the_valid_ones():
    with pytest.raises(ValueError, match="unknown inverse method 'nope'; valid methods: .*ddnm.*repaint"):
        solve_inverse(PRIOR, OP, Y, method="nope")
    with pytest.raises(ValueError, match=r"y has shape \(3,\) but .* observations of shape \(2,\)"):
        solve_inverse(PRIOR, OP, torch.zeros(3), method="ddnm")
    with pytest.raises(ValueError, match=r"model's samples have shape \(4,\) but the operator expects "
                                         r"in_shape \(3, 2, 2\)"):
        solve_inverse(PRIOR, Colorization((3, 2, 2)), torch.zeros(1, 2, 2), method="ddnm")
    with pytest.raises(ValueError, match="method 'repaint' has no option 'jumps'; its options: jump_length"):
        solve_inverse(PRIOR, OP, Y, method="repaint", jumps=3)
    with pytest.raises(ValueError, match="takes no solver"):
        solve_inverse(PRIOR, OP, Y, method="repaint", solver="ddim")
    with pytest.raises(ValueError, match="unknown solver 'ddim2'"):
        solve_inverse(PRIOR, OP, Y, method="ddnm", solver="ddim2")
    with pytest.raises(ValueError, match="sigma_y must be a finite number >= 0"):
        solve_inverse(PRIOR, OP, Y, method="ddnm", sigma_y=-0.1)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        solve_inverse(PRIOR, OP, Y, method="ddnm", nfe=0)
    with pytest.raises(ValueError, match="n=3 samples asked of a batch of 2"):
        solve_inverse(PRIOR, OP, Y.expand(2, 2), method="ddnm", n=3)
    with pytest.raises(ValueError, match=r"x_T must have shape \(5, 4\)"):
        solve_inverse(PRIOR, OP, Y, method="ddnm", n=5, x_T=torch.zeros(4, 4))

    class NoPinv(LinearOperator):
        in_shape = out_shape = torch.Size((4,))

        def _a(self, xf):
            return xf

        def _at(self, yf):
            return yf

    with pytest.raises(ValueError, match="method 'ddnm' needs the operator's pinv, which NoPinv lacks"):
        solve_inverse(PRIOR, NoPinv(), torch.zeros(4), method="ddnm")


def test_registry_refuses_duplicates_and_bad_signatures():
    with pytest.raises(ValueError, match="registered twice"):
        register_method("ddnm")(lambda model, operator, y, *, sigma_y, x_T, nfe, solver, generator: None)
    with pytest.raises(ValueError, match="must accept generator"):
        register_method("_bad")(lambda model, operator, y, *, sigma_y, x_T, nfe, solver: None)
    with pytest.raises(ValueError, match="unknown need"):
        register_method("_bad2", needs=("inverse",))
    assert "_bad" not in METHODS


def test_non_finite_samples_stop_with_an_error_naming_the_method():
    """A method whose loop diverges (PiGDM with a noiseless mask on a trained network did) raises
    instead of handing NaN samples back."""
    @register_method("_diverges")
    def _diverges(model, operator, y, *, sigma_y, x_T, nfe, solver, generator):
        x = x_T.clone()
        x[1] = float("nan")
        return MethodResult(samples=x, nfe=0)
    try:
        with pytest.raises(sde_diffusion.models.NonFiniteError,
                           match=r"'_diverges' produced NaN/Inf in 1 of 3 samples \(first: index 1\)"):
            solve_inverse(PRIOR, OP, Y, method="_diverges", n=3, nfe=4)
    finally:
        METHODS.pop("_diverges", None)


@pytest.mark.parametrize("method", MINE)
def test_nfe_counted_batches_and_seeds(method):
    """The NFE is the wrapper's count (within the budget); with an int seed the first samples of a
    batch of 6 are those of a batch of 3; a float32 observation gives float32 samples; the
    observed part is y (noiseless methods project on A x = y at the end)."""
    nfe = 24
    # score_sde's default Langevin step averages norms over the batch (its rule): per sample here
    opts = {"solver_options": {"snr_norm": "sample"}} if method == "score_sde" else {}
    r6 = solve_inverse(PRIOR, OP, Y, method=method, n=6, nfe=nfe, generator=3, **opts)
    r3 = solve_inverse(PRIOR, OP, Y, method=method, n=3, nfe=nfe, generator=3, **opts)
    assert isinstance(r6, MethodResult) and r6.method == method
    assert 1 <= r6.nfe <= nfe and r6.nfe == r3.nfe
    torch.testing.assert_close(r6.samples[:3], r3.samples, rtol=0, atol=1e-12)
    assert r6.samples.shape == (6, 4) and r6.samples.dtype == torch.float64
    assert not torch.equal(r6.samples[0], r6.samples[1])
    if method != "ddnm_plus":
        torch.testing.assert_close(OP.A(r6.samples), Y.expand(6, 2), rtol=0, atol=1e-12)
    r32 = solve_inverse(PRIOR, OP, Y.float(), method=method, n=2, nfe=nfe)
    assert r32.samples.dtype == torch.float32 and torch.isfinite(r32.samples).all()


def test_image_operators_run_on_images():
    prior = random_mixture((3, 2, 4), 3, seed=1, sde=VPSDE())
    x0 = prior.sample(1, generator=torch.Generator().manual_seed(0))
    for op in (Colorization((3, 2, 4)), BlockAverage(2, (3, 2, 4)), Mask(half_mask((3, 2, 4)))):
        for method in MINE:
            r = solve_inverse(prior, op, op.A(x0)[0], method=method, n=3, nfe=10)
            assert r.samples.shape == (3, 3, 2, 4)
            if method != "ddnm_plus":
                torch.testing.assert_close(op.A(r.samples), op.A(x0).expand(3, *op.out_shape),
                                           rtol=0, atol=1e-5)


def test_ddnm_runs_any_solver_and_its_wrapper_views_agree():
    from sde_diffusion.inverse.methods.ddnm import RangeNullSpaceModel
    from sde_diffusion.models import OracleModel

    for solver in ("dpm_solver++_2m", "euler_maruyama", "ode_heun"):
        r = solve_inverse(PRIOR, OP, Y, method="ddnm", solver=solver, n=4, nfe=12)
        assert 1 <= r.nfe <= 12 and r.info["solver"] == solver
        torch.testing.assert_close(OP.A(r.samples), Y.expand(4, 2), rtol=0, atol=1e-12)
    inner = OracleModel(PRIOR)
    wrapped = RangeNullSpaceModel(inner, OP, Y.expand(5, 2))
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    a, s = float(VPSDE().alpha(0.4)), float(VPSDE().sigma(0.4))
    x0 = wrapped.x0(x, t)
    torch.testing.assert_close(OP.A(x0), Y.expand(5, 2), rtol=0, atol=1e-12)     # projected
    torch.testing.assert_close(x0[:, 2:], inner.x0(x, t)[:, 2:])                  # null space kept
    for view in ("eps", "x0", "score"):
        torch.testing.assert_close(getattr(wrapped, view)(x, t), wrapped.at_scales(view, x, t, a, s))
    torch.testing.assert_close(wrapped.score(x, t), -(x - a * x0) / s ** 2)
    assert wrapped.nfe == inner.nfe == 9          # every view call, counted once by the inner model
