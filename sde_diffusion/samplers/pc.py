r"""The predictor-corrector sampler ([SDE] Song et al. 2021, Sec. 4.2, Alg. 1–3; score_sde's
``pc_sampler``): on every grid step a predictor moves the state from ``t_i`` to ``t_{i+1}``, then
``n_steps`` corrector (Langevin) steps refine it at ``t_{i+1}`` towards ``p_{t_{i+1}}``.

The predictor is any registered solver that exposes its single step (``register(..., step=...)``,
see :class:`~.registry.SolverInfo`): its step is the very function its stand-alone solver runs, so
``corrector="none"`` gives the predictor's samples exactly, and a new one-step solver serves as a
predictor without an edit here. ``predictor="none"`` is the corrector-only sampler
(score_sde's Langevin-only / NCSN's annealed Langevin dynamics over the grid's noise levels).

Order within a step: predictor first, then the corrector at the time it reached, so the last
correction happens at ``t_end``. score_sde runs the corrector first, at ``t_i``, and then the
predictor; the two orders differ only at the ends (ours skips a correction of the prior sample at
``T``, which is already ``p_T`` in distribution, and corrects the final state at ``t_end``).
"""
from __future__ import annotations

from typing import List

from .._checks import require
from .base import SolverContext
from .correctors import CORRECTORS, check_corrector_options
from .registry import available_solvers, get_solver, register

__all__ = ["predictors"]


def predictors() -> List[str]:
    """The valid predictors: every registered solver with a single-step function
    (:attr:`~.registry.SolverInfo.step`), and ``none``."""
    return [name for name, info in available_solvers().items() if info.step is not None] + ["none"]


def _predictor_options(predictor: str, eta: float) -> dict:
    """The options ``pc`` gives its predictor (a name of :func:`predictors`): ``eta`` where the
    predictor has it (DDIM's); a nonzero ``eta`` for a predictor without one is an error, not
    ignored."""
    valid = predictors()
    require(predictor in valid, f"unknown predictor {predictor!r}; valid predictors: {', '.join(valid)}")
    if predictor != "none" and "eta" in get_solver(predictor).defaults():
        return {"eta": eta}
    require(float(eta) == 0.0, f"eta={eta!r} is an option of the predictor 'ddim', not of "
                               f"predictor {predictor!r}")
    return {}


def _pc_cost(steps: int, predictor: str = "reverse_diffusion", corrector: str = "langevin",
             n_steps: int = 1, eta: float = 0.0) -> int:
    options = _predictor_options(predictor, eta)
    moves = 0 if predictor == "none" else get_solver(predictor).cost(steps, **options)
    return moves + (steps * int(n_steps) if corrector != "none" else 0)


def _pc_deterministic(predictor: str, corrector: str, n_steps: int, eta: float, **_) -> bool:
    """Deterministic only without corrector steps (a Langevin step draws noise) and with a
    deterministic predictor."""
    return ((corrector == "none" or int(n_steps) == 0) and predictor != "none"
            and get_solver(predictor).is_deterministic(**_predictor_options(predictor, eta)))


@register("pc", deterministic=_pc_deterministic, two_way=True, order=0.5, nfe=_pc_cost,
          summary="predictor-corrector: any predictor + Langevin / annealed Langevin corrector")
def pc(ctx: SolverContext, x, predictor: str = "reverse_diffusion", corrector: str = "langevin",
       snr: float = 0.16, n_steps: int = 1, snr_norm: str = "batch", eta: float = 0.0):
    """Predictor-corrector sampling ([SDE] Alg. 1–3).

    Args:
        predictor: any registered solver with a single-step function (:func:`predictors`:
            ``euler_maruyama``, ``reverse_diffusion`` (default, as in score_sde's VE configs),
            ``ancestral``, ``ddim``, ``edm_euler``, ``dpm_solver_2``, ...), run with its default
            options (and ``eta``), or ``none``.
        corrector: ``langevin`` (default), ``annealed_langevin`` or ``none``.
        snr: the corrector's signal-to-noise ratio (0.16 as in score_sde's CIFAR-10 configs).
        n_steps: corrector steps per grid step.
        snr_norm: ``batch`` (default, score_sde's rule: the Langevin step from the norms of score
            and noise averaged over the batch) or ``sample`` (per sample: a sample's result then
            does not depend on its batch companions, but the rule is reliable only in high
            dimension; see :mod:`.correctors`).
        eta: DDIM's ``eta`` when ``predictor="ddim"`` (an error for a predictor without it).

    NFE per grid step: the predictor's (1 for score_sde's predictors and DDIM; 0 for ``none``)
    plus ``n_steps`` for the corrector.
    """
    options = _predictor_options(predictor, eta)
    corrector, snr, n_steps, snr_norm = check_corrector_options(corrector, snr, n_steps, snr_norm)
    require(predictor != "none" or (corrector != "none" and n_steps > 0),
            "pc with predictor='none' needs a corrector and n_steps >= 1: otherwise it does nothing")
    if predictor == "none":
        advance = None
    else:
        info = get_solver(predictor)
        advance = info.step(ctx, **{**info.defaults(), **options})
    correct = CORRECTORS.get(corrector) if n_steps > 0 else None
    return _pc(ctx, x, advance, correct, n_steps, snr, snr_norm)


def _pc(ctx: SolverContext, x, advance, correct, n_steps: int, snr: float, snr_norm: str):
    for i in range(ctx.steps):
        if advance is not None:
            x = advance(i, x)
        if correct is not None:
            for _ in range(n_steps):
                x = correct(ctx, i + 1, x, snr, snr_norm)
        x = yield x
