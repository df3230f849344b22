"""Build a network from an ``ml_collections`` model config (score_sde's ``config.model``)."""
from __future__ import annotations

import inspect
from typing import Mapping, Sequence

from torch import nn

from .._checks import require
from .mlp import TimeMLP
from .unet import UNet

__all__ = ["NETWORKS", "build_network"]

NETWORKS = {"mlp": TimeMLP, "unet": UNet}


def _fields(config) -> Mapping:
    if hasattr(config, "to_dict"):          # ml_collections.ConfigDict / FrozenConfigDict
        return config.to_dict()
    require(isinstance(config, Mapping), f"model_config must be a ConfigDict or a mapping, got "
                                         f"{type(config).__name__}")
    return dict(config)


def build_network(model_config, data_shape: Sequence[int]) -> nn.Module:
    """The network named by ``model_config.name`` for data of shape ``data_shape``.

    ``name`` is ``"mlp"`` (``data_shape = (dim,)``) or ``"unet"`` (``data_shape = (C, H, W)`` with
    ``H == W``). Every other field is a constructor argument of :class:`TimeMLP` / :class:`UNet` of
    the same name (missing ones take the constructor defaults); the data size arguments (``dim``;
    ``in_channels``, ``image_size``) come from ``data_shape`` (a field of that name must agree with
    it). A field the network does not take raises ``ValueError`` listing the valid ones, so a typo
    never passes silently: strip SDE/EMA keys first (``sde_diffusion.config.network_config``).
    """
    fields = _fields(model_config)
    name = fields.get("name")
    require(name in NETWORKS, f"model name must be one of {sorted(NETWORKS)}, got {name!r}")
    shape = tuple(int(s) for s in data_shape)
    cls = NETWORKS[name]
    if name == "mlp":
        require(len(shape) == 1, f"the mlp network needs data_shape (dim,), got {shape}")
        sized = {"dim": shape[0]}
    else:
        require(len(shape) == 3 and shape[1] == shape[2],
                f"the unet network needs square images, data_shape (C, H, H), got {shape}")
        sized = {"in_channels": shape[0], "image_size": shape[1]}
    params = [p for p in inspect.signature(cls).parameters if p not in sized]
    unknown = sorted(k for k in fields if k != "name" and k not in params and k not in sized)
    require(not unknown, f"model config fields {unknown} are not arguments of {cls.__name__} "
                         f"(name={name!r}); valid fields are {params}")
    for key, value in sized.items():
        if fields.get(key, value) != value:
            raise ValueError(f"model config field {key}={fields[key]!r} contradicts data_shape {shape} "
                             f"({key}={value})")
    kwargs = {k: v for k, v in fields.items() if k in params}
    for key in ("channel_mults", "attn_resolutions"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return cls(**sized, **kwargs)
