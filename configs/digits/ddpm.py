"""Digits with DDPM's discrete eps loss (Ho et al. 2020, eq. 14) instead of continuous DSM;
otherwise as vp.py (the trained network samples with every continuous-time solver)."""
from sde_diffusion.config import digits_config


def get_config():
    config = digits_config("vpsde")
    config.training.continuous = False
    return config
