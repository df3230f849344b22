"""Build a network, and the model that wraps it, from an ``ml_collections`` config (score_sde's
layout): :func:`build_network` from ``config.model``'s constructor fields, :func:`model_from_config`
the :class:`~sde_diffusion.models.ScoreModel` of a whole config (or, for
``config.training.task = "classifier"``, the
:class:`~sde_diffusion.models.classifier.NoisyClassifier`). Training, checkpoints and the command
line build their models here and nowhere else."""
from __future__ import annotations

import inspect
from typing import Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .._checks import require
from ..config import TASKS, build_sde, network_config
from ..sdes import SDE
from .classifier import CLASSIFIER_NETWORKS, NoisyClassifier
from .mlp import TimeMLP
from .unet import UNet
from .wrapper import ScoreModel

__all__ = ["NETWORKS", "build_network", "model_from_config", "config_task"]

#: the score networks by config name; the classifiers (``training.task = "classifier"``) are
#: :data:`~sde_diffusion.models.classifier.CLASSIFIER_NETWORKS`.
NETWORKS = {"mlp": TimeMLP, "unet": UNet}


def _fields(config) -> Mapping:
    if hasattr(config, "to_dict"):          # ml_collections.ConfigDict / FrozenConfigDict
        return config.to_dict()
    require(isinstance(config, Mapping), f"model_config must be a ConfigDict or a mapping, got "
                                         f"{type(config).__name__}")
    return dict(config)


def build_network(model_config, data_shape: Sequence[int]) -> nn.Module:
    """The network named by ``model_config.name`` for data of shape ``data_shape``.

    ``name`` is ``"mlp"`` or ``"mlp_classifier"`` (``data_shape = (dim,)``), ``"unet"`` or
    ``"unet_classifier"`` (``data_shape = (C, H, W)`` with ``H == W``). Every other field is a constructor argument of :class:`TimeMLP` / :class:`UNet` of
    the same name (missing ones take the constructor defaults); the data size arguments (``dim``;
    ``in_channels``, ``image_size``) come from ``data_shape`` (a field of that name must agree with
    it). A field the network does not take raises ``ValueError`` listing the valid ones, so a typo
    never passes silently: strip SDE/EMA keys first (``sde_diffusion.config.network_config``).
    """
    fields = _fields(model_config)
    name = fields.get("name")
    require(name in NETWORKS or name in CLASSIFIER_NETWORKS,
            f"model name must be one of {sorted(NETWORKS)}, got {name!r} (classifiers, for "
            f"training.task='classifier': {sorted(CLASSIFIER_NETWORKS)})")
    shape = tuple(int(s) for s in data_shape)
    cls = NETWORKS[name] if name in NETWORKS else CLASSIFIER_NETWORKS[name]
    if name.startswith("mlp"):
        require(len(shape) == 1, f"the {name} network needs data_shape (dim,), got {shape}")
        sized = {"dim": shape[0]}
    else:
        require(len(shape) == 3 and shape[1] == shape[2],
                f"the {name} network needs square images, data_shape (C, H, H), got {shape}")
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


def config_task(config) -> str:
    """``config.training.task`` (``"score"`` when absent), checked against ``config.model``: the
    classifier task needs a classifier network and ``num_classes``, the score task a score
    network."""
    task = str(config.training.get("task", "score"))
    require(task in TASKS, f"config.training.task must be one of {TASKS}, got {task!r}")
    model = config.get("model", None) or {}
    name = model.get("name", None)
    if task == "classifier":
        require(model.get("num_classes", None) is not None,
                "config.training.task='classifier' needs config.model.num_classes (the number of "
                "classes K >= 2)")
        require(name is None or name in CLASSIFIER_NETWORKS,
                f"config.training.task='classifier' needs a classifier network, config.model.name "
                f"one of {sorted(CLASSIFIER_NETWORKS)}, got {name!r}")
    else:
        require(name not in CLASSIFIER_NETWORKS,
                f"config.model.name={name!r} is a classifier: set config.training.task='classifier' "
                f"to train it, or name a score network ('mlp', 'unet')")
    return task


def model_from_config(config, data_shape: Optional[Sequence[int]] = None, *, sde: Optional[SDE] = None,
                      net: Optional[nn.Module] = None,
                      check_finite: bool = True) -> Tuple[nn.Module, Union[ScoreModel, NoisyClassifier]]:
    """``(net, model)``: the network ``config.model`` names, built for data of shape
    ``data_shape`` (:func:`build_network` of :func:`~sde_diffusion.config.network_config`), and
    the :class:`ScoreModel` that reads it with ``config.model.parameterization`` and
    ``config.model.time_input`` under ``sde`` (default: :func:`~sde_diffusion.config.build_sde`
    of ``config``). For ``config.training.task = "classifier"`` the model is the
    :class:`~sde_diffusion.models.classifier.NoisyClassifier` of the network (with
    ``config.model.time_input`` and ``num_classes``).

    Pass ``net`` (a network of your own, an EMA copy, a ``DistributedDataParallel`` wrapper) to
    wrap it instead of building one; ``data_shape`` is then not needed. ``check_finite`` is the
    wrapper's NaN/Inf check (off in the training loop, where it would sync the device per step).
    """
    task = config_task(config)
    if net is None:
        require(data_shape is not None, "model_from_config needs data_shape to build a network")
        net = build_network(network_config(config.model), tuple(int(s) for s in data_shape))
    sde = build_sde(config) if sde is None else sde
    if task == "classifier":
        return net, NoisyClassifier(net, sde, time_input=str(config.model.time_input),
                                    num_classes=int(config.model.num_classes))
    model = ScoreModel(net, sde, parameterization=str(config.model.parameterization),
                       time_input=str(config.model.time_input), check_finite=check_finite)
    return net, model
