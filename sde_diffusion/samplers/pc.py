r"""The predictor-corrector sampler ([SDE] Song et al. 2021, Sec. 4.2, Alg. 1–3; score_sde's
``pc_sampler``): on every grid step a predictor moves the state from ``t_i`` to ``t_{i+1}``, then
``n_steps`` corrector (Langevin) steps refine it at ``t_{i+1}`` towards ``p_{t_{i+1}}``.

The predictor step is the very function its stand-alone solver uses, so ``corrector="none"``
gives the predictor's samples exactly. ``predictor="none"`` is the corrector-only sampler
(score_sde's Langevin-only / NCSN's annealed Langevin dynamics over the grid's noise levels).

Order within a step: predictor first, then the corrector at the time it reached, so the last
correction happens at ``t_end``. score_sde runs the corrector first, at ``t_i``, and then the
predictor; the two orders differ only at the ends (ours skips a correction of the prior sample at
``T``, which is already ``p_T`` in distribution, and corrects the final state at ``t_end``).
"""
from __future__ import annotations

from .._checks import require
from .base import SolverContext
from .correctors import CORRECTORS, check_corrector_options
from .ddim import check_eta, ddim_step
from .registry import register
from .reverse_sde import ancestral_step, check_ancestral, euler_maruyama_step, reverse_diffusion_step

__all__ = ["PREDICTORS"]

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "ddim", "none")


def _pc_cost(steps: int, predictor: str = "reverse_diffusion", corrector: str = "langevin",
             n_steps: int = 1) -> int:
    return steps * (int(predictor != "none") + (int(n_steps) if corrector != "none" else 0))


@register("pc", stochastic=True, order=0.5, nfe=_pc_cost,
          summary="predictor-corrector: any predictor + Langevin / annealed Langevin corrector")
def pc(ctx: SolverContext, x, predictor: str = "reverse_diffusion", corrector: str = "langevin",
       snr: float = 0.16, n_steps: int = 1, snr_norm: str = "batch", eta: float = 0.0):
    """Predictor-corrector sampling ([SDE] Alg. 1–3).

    Args:
        predictor: ``euler_maruyama``, ``reverse_diffusion`` (default, as in score_sde's VE
            configs), ``ancestral``, ``ddim`` (with ``eta``) or ``none``.
        corrector: ``langevin`` (default), ``annealed_langevin`` or ``none``.
        snr: the corrector's signal-to-noise ratio (0.16 as in score_sde's CIFAR-10 configs).
        n_steps: corrector steps per grid step.
        snr_norm: ``batch`` (default, score_sde's rule: the Langevin step from the norms of score
            and noise averaged over the batch) or ``sample`` (per sample: a sample's result then
            does not depend on its batch companions, but the rule is reliable only in high
            dimension; see :mod:`.correctors`).
        eta: DDIM's ``eta`` when ``predictor="ddim"``.

    NFE per grid step: 1 for the predictor (0 for ``none``) plus ``n_steps`` for the corrector.
    """
    require(predictor in PREDICTORS,
            f"unknown predictor {predictor!r}; valid predictors: {', '.join(PREDICTORS)}")
    corrector, snr, n_steps, snr_norm = check_corrector_options(corrector, snr, n_steps, snr_norm)
    eta = check_eta(eta)
    require(predictor != "none" or (corrector != "none" and n_steps > 0),
            "pc with predictor='none' needs a corrector and n_steps >= 1: otherwise it does nothing")
    kind = check_ancestral(ctx) if predictor == "ancestral" else None
    correct = CORRECTORS.get(corrector) if n_steps > 0 else None
    for i in range(ctx.steps):
        if predictor == "euler_maruyama":
            x = euler_maruyama_step(ctx, i, x)
        elif predictor == "reverse_diffusion":
            x = reverse_diffusion_step(ctx, i, x)
        elif predictor == "ancestral":
            x = ancestral_step(ctx, i, x, kind)
        elif predictor == "ddim":
            x = ddim_step(ctx, i, x, eta)
        if correct is not None:
            t = ctx.t(i + 1)
            for _ in range(n_steps):
                x = correct(ctx, t, x, snr, snr_norm)
        yield x
