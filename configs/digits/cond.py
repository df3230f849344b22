"""Class-conditional digits (labels 0..9, null label 10) with the VP SDE and the U-Net of vp.py
with a label embedding; labels dropped to the null label with probability 0.1 for
classifier-free guidance (Ho & Salimans 2022). Otherwise as vp.py: CPU-sized, see
docs/training.md for the measured speed."""
from sde_diffusion.config import digits_config


def get_config():
    config = digits_config("vpsde")
    config.model.num_classes = 10
    config.training.p_uncond = 0.1
    return config
