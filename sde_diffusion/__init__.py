"""sde_diffusion: score-based generative modelling with SDEs (Song et al., 2021).

The public API: the forward SDEs, the exact Gaussian-mixture oracle, the model wrapper, one
sampling entry point with a registry of solvers, the probability-flow log-likelihood, and
training with preview pictures (:func:`train`, :func:`evaluate_model`). The training job itself
lives in :mod:`sde_diffusion.training`, networks in :mod:`sde_diffusion.models`.
"""
from .evaluation import evaluate_model, train
from .likelihood import image_log_likelihood, log_likelihood
from .inverse import (BlockAverage, Colorization, Dense, LinearOperator, Mask, observe,
                      solve_inverse)
from .inverse.posterior import exact_posterior
from .models import ClassifierFreeGuidance, ClassifierGuidance, OracleModel, ScoreModel
from .models import from_diffusers, from_k_diffusion
from .oracles import GaussianMixture, random_mixture
from .samplers import available_solvers, make_grid, optimize_grid, sample
from .sdes import SDE, VESDE, VPSDE, ReverseSDE, SubVPSDE

__version__ = "0.1.0"

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseSDE", "GaussianMixture", "random_mixture",
           "ScoreModel", "OracleModel", "ClassifierFreeGuidance", "ClassifierGuidance",
           "from_diffusers", "from_k_diffusion", "sample", "available_solvers", "make_grid",
           "optimize_grid", "log_likelihood", "image_log_likelihood", "train", "evaluate_model",
           "solve_inverse", "LinearOperator", "Mask", "Colorization", "BlockAverage", "Dense",
           "observe", "exact_posterior"]
