"""Two moons with the sub-VP SDE (Song et al. 2021, eq. 12); otherwise as moons_vp.py."""
from sde_diffusion.config import toy_config


def get_config():
    return toy_config("moons", "subvpsde")
