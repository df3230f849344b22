"""Two moons with the VP SDE (Song et al. 2021, eq. 11) and a time-conditioned MLP: the default
toy set-up. Every field is listed in ``sde_diffusion.config.toy_config`` and
``default_config``; change them here or with ``--config.KEY=VALUE``."""
from sde_diffusion.config import toy_config


def get_config():
    config = toy_config("moons", "vpsde")
    return config
