"""Two moons with the sub-VP SDE (Song et al. 2021, eq. 12); otherwise as moons_vp.py."""
import os

from sde_diffusion.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "moons_vp.py"))
    config.training.sde = "subvpsde"
    return config
