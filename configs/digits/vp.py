"""sklearn's 8x8 digits with the VP SDE and a small DDPM++-style U-Net (CPU-sized).
Every field is listed in ``sde_diffusion.config.digits_config``."""
from sde_diffusion.config import digits_config


def get_config():
    config = digits_config("vpsde")
    return config
