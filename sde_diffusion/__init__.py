"""sde_diffusion: score-based generative modelling with SDEs (Song et al., 2021)."""
from .models import OracleModel, ScoreModel
from .oracles import GaussianMixture, random_mixture
from .samplers import available_solvers, sample
from .sdes import SDE, VESDE, VPSDE, ReverseSDE, SubVPSDE

__version__ = "0.1.0"
