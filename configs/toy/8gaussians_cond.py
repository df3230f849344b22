"""Class-conditional eight Gaussians (label k = the mode at angle k pi/4) with the VP SDE and a
TimeMLP with a label embedding (num_classes=8, null label 8); labels dropped to the null label with
probability 0.1 so that the one network also learns the unconditional score, as classifier-free
guidance needs (Ho & Salimans 2022, p_uncond 0.1-0.2). Otherwise as moons_vp.py."""
from sde_diffusion.config import toy_config


def get_config():
    config = toy_config("8gaussians", "vpsde")
    config.model.num_classes = 8
    config.training.p_uncond = 0.1
    return config
