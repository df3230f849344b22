"""Two moons with the VE SDE (Song et al. 2021, eq. 9); otherwise as moons_vp.py.

sigma_max follows Song & Ermon (2020), technique 1: about the largest distance between two
training points (the moons lie in roughly [-1, 1]^2, so about 3); 4 leaves a margin.
"""
import os

from sde_diffusion.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "moons_vp.py"))
    config.training.sde = "vesde"
    config.model.sigma_min = 0.01
    config.model.sigma_max = 4.0
    return config
