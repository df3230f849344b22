"""Digits with DDPM's discrete eps loss (Ho et al. 2020, eq. 14) instead of continuous DSM;
otherwise as vp.py (the same network samples with every continuous-time solver)."""
import os

from sde_diffusion.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vp.py"))
    config.training.continuous = False
    return config
