"""Networks and the parameterization wrapper that turns any network into score / eps / x0."""
from .adapters import DiscreteVPSDE, EDMSDE, from_diffusers, from_k_diffusion
from .factory import NETWORKS, build_network, model_from_config
from .guidance import ClassifierFreeGuidance, ClassifierGuidance
from .mlp import TimeMLP
from .unet import UNet
from .wrapper import NonFiniteError, OracleModel, ScoreModel

__all__ = ["ScoreModel", "OracleModel", "NonFiniteError", "TimeMLP", "UNet", "build_network",
           "model_from_config", "NETWORKS"]
__all__ += ["from_diffusers", "from_k_diffusion", "DiscreteVPSDE", "EDMSDE"]
__all__ += ["ClassifierFreeGuidance", "ClassifierGuidance"]
