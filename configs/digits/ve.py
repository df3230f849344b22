"""sklearn's 8x8 digits with the VE SDE (sigma from 0.01 to 12, about the largest distance between
two digits scaled to [-1, 1]: Song & Ermon 2020, technique 1); otherwise as vp.py, so the VP and VE
studies of docs/studies.md compare SDEs and not networks."""
from sde_diffusion.config import digits_config


def get_config():
    config = digits_config("vesde")
    return config
