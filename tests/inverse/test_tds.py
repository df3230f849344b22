"""TDS, the twisted diffusion sampler with PiGDM's twisting (sde_diffusion/inverse/methods/tds.py),
against the exact posterior on test_smc.py's problem (MCGdiff's Gaussian mixture scaled by 1/16,
``d_x = 8``, one random projection): the distance falls from one particle (PiGDM's own chain) to
64 and beats PiGDM; noiseless on every SDE with ``A x = y`` met; one-line errors. test_smc.py runs
its batch-independence and image-operator tests for both SMC methods. Measured values in the
comments; the bounds leave margin on them."""
import pytest

from test_smc import SDES, _problem, _run  # noqa: E402


# measured (VP, sigma_y 0.05, NFE 50, seeds 0-2, 100 samples): 1 particle 0.255 (0.338, 0.113,
# 0.313), 4: 0.137, 16: 0.083, 64: 0.102 (0.083, 0.130, 0.092); PiGDM 0.242 (0.321, 0.104, 0.301);
# MCGdiff 64 particles 0.078
def test_error_falls_with_particles_and_beats_pigdm():
    one, many, pigdm = [], [], []
    for seed in range(3):
        problem = _problem("vp", 0.05, seed)
        one.append(_run(problem, "tds", 50, 0.05, seed, particles=1)[1])
        many.append(_run(problem, "tds", 50, 0.05, seed, particles=64)[1])
        pigdm.append(_run(problem, "pigdm", 50, 0.05, seed)[1])
    one, many, pigdm = (sum(v) / len(v) for v in (one, many, pigdm))
    assert many < 0.5 * one
    assert many < 0.6 * pigdm
    assert many < 0.14


# measured (seed 0, NFE 50, 100 samples, 64 particles; prior 0.555): vp 0.165, ve 0.121, subvp 0.157
@pytest.mark.parametrize("sde", sorted(SDES))
def test_noiseless_on_every_sde(sde):
    problem = _problem(sde, 0.0, 0)
    r, d = _run(problem, "tds", 50, 0.0, particles=64)
    op, y = problem[1], problem[2]
    assert float((op.A(r.samples) - y).abs().max()) < 1e-10
    assert d < 0.4 * problem[5]
    assert r.info["particles"] == 64 and r.info["network_batch"] == 64 * 100
    assert 0 < r.info["resampling_rate"] < 1


def test_errors():
    problem = _problem("vp", 0.05, 0)
    with pytest.raises(ValueError, match="particles must be an integer >= 1, got 0"):
        _run(problem, "tds", 5, 0.05, particles=0)
    with pytest.raises(ValueError, match="unknown resampling 'stratified'"):
        _run(problem, "tds", 5, 0.05, resampling="stratified")
    with pytest.raises(ValueError, match="unknown guidance 'twisted'"):
        _run(problem, "tds", 5, 0.05, guidance="twisted")
    with pytest.raises(ValueError, match="ess_threshold must lie in"):
        _run(problem, "tds", 5, 0.05, ess_threshold=2)
