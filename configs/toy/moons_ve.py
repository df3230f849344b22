"""Two moons with the VE SDE (Song et al. 2021, eq. 9); otherwise as moons_vp.py.

sigma_max = 4 (Song & Ermon 2020, technique 1: about the largest distance between two training
points; the moons lie in roughly [-1, 1]^2), sigma_min = 0.01.
"""
from sde_diffusion.config import toy_config


def get_config():
    config = toy_config("moons", "vesde")
    config.model.sigma_min = 0.01
    config.model.sigma_max = 4.0
    return config
