"""Shared test fixtures' data: the forward SDEs every test module runs over."""
from sde_diffusion import VESDE, VPSDE, SubVPSDE

#: the four forward processes with their default parameters
SDES = {
    "vp": lambda: VPSDE(),
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "subvp": lambda: SubVPSDE(),
    "ve": lambda: VESDE(),
}
