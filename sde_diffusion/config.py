"""Configuration helpers: load a config file, override fields with type checking, build the SDE.

Configs are ``ml_collections.ConfigDict`` objects in score_sde's layout (``training``, ``sampling``,
``eval``, ``data``, ``model``, ``optim``, plus ``seed`` and ``device``). A config file is a Python
file with a ``get_config()`` function (see ``configs/``); :func:`default_config` holds every field
that the training loop reads, with its default, so a config file only states what it changes.

Overrides use the same dotted names as score_sde's ``--config.optim.lr=1e-3`` flags::

    config = load_config("configs/toy/moons_vp.py")
    apply_overrides(config, ["--config.optim.lr=1e-3", "training.n_iters=2000"])
    apply_overrides(config, {"model.ema_rate": 0.999})

An unknown key raises ``ValueError`` listing the closest valid keys; a value of the wrong type
raises ``ValueError`` naming the key, the expected type and the value.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Union

import ml_collections

from ._checks import require
from .sdes import SDE, canonical_sde_name, make_sde

__all__ = ["default_config", "toy_config", "digits_config", "cifar10_config", "classifier_config", "TASKS",
           "check_p_uncond", "TOY_DATASETS", "load_config",
           "apply_overrides", "parse_overrides", "build_sde", "flatten", "config_to_json",
           "config_from_json", "network_config", "MODEL_KEYS", "NULLABLE_FIELDS"]

#: fields that may be set back to ``None`` after holding a value (``None`` means "off/default").
NULLABLE_FIELDS = ("num_classes", "embed_dim", "time_scale")

#: what a run trains (``config.training.task``): a score model (``"score"``) or a noise-conditional
#: classifier ``p(y | x_t, t)`` (``"classifier"``, :func:`classifier_config`).
TASKS = ("score", "classifier")

#: keys of ``config.model`` read by the SDE builder and the training loop, not by the network
#: constructor; :func:`network_config` drops them before calling ``build_network``.
MODEL_KEYS = ("parameterization", "time_input", "ema_rate", "beta_min", "beta_max", "sigma_min",
              "sigma_max", "num_scales", "cosine_s", "cosine_t_max", "sde_eps")


def default_config() -> ml_collections.ConfigDict:
    """Every field the training loop reads, with score_sde-like defaults (a 2-D toy set-up).

    Config files start from this and change what they need; ``model`` holds only the keys that
    are not network constructor arguments: a config file adds its network's fields (``name`` plus
    the constructor arguments of ``TimeMLP`` or ``UNet``).
    """
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.device = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"               # a name of sde_diffusion.sdes.SDE_NAMES (or score_sde's)
    training.continuous = True           # continuous-time DSM; False: DDPM (VP) / SMLD (VE) loss
    training.likelihood_weighting = False  # lambda(t) = g(t)^2 instead of sigma(t)^2
    training.importance_sampling = False  # t ~ g^2/sigma^2 (uniform in log-SNR), reweighted
    training.reduce_mean = True          # mean over data dims; False: 0.5 * sum (score_sde)
    training.eps = 1e-5                  # smallest training time (score_sde: 1e-5)
    training.batch_size = 512            # global batch, split over DDP ranks
    training.n_iters = 10000
    training.log_freq = 100              # loss log (CSV) and NaN check every log_freq steps
    training.snapshot_freq = 0           # numbered checkpoint_<step>.pt every N steps (0: off)
    training.snapshot_freq_for_preemption = 1000  # checkpoint_last.pt every N steps
    training.sample_freq = 0             # preview grid/scatter every N steps (0: off)
    training.n_preview = 64              # samples per preview
    training.mixed_precision = "no"      # "no", "bf16" or "fp16" (autocast; GPU only)
    training.task = "score"              # "score" or "classifier" (noise-conditional p(y | x_t))
    training.p_uncond = 0.0              # label dropout to the null label (classifier-free guidance)

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "euler_maruyama"   # a solver name of sde_diffusion.samplers
    sampling.steps = 500
    sampling.noise_removal = True        # a final Tweedie step x <- E[x0 | x_eps] (score_sde)

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.n_samples = 5000            # evaluate_model (the metric follows data.dataset)
    evaluate.batch_size = 1000

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "moons"               # a name of sde_diffusion.data.get_dataset
    data.n_train = 20000                 # size of the training set of the 2-D toys
    data.image_size = 8                  # digits: 8 or 16
    data.split = "train"                 # digits split
    data.path = ""                       # npz / image folder path
    data.key = "x"                       # npz array name
    data.num_channels = 1                # image folder channels

    config.model = model = ml_collections.ConfigDict()
    model.name = "mlp"                   # mlp | unet (| mlp_classifier | unet_classifier)
    model.parameterization = "eps"       # eps | x0 | v | score
    model.time_input = "t"               # t | sigma | index: what the network receives
    model.ema_rate = 0.999
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.sigma_min = 0.01
    model.sigma_max = 50.0
    model.num_scales = 1000
    model.cosine_s = 0.008
    model.cosine_t_max = 0.9946
    model.sde_eps = 0.0                  # SDE.eps (sampling/likelihood end); 0: the SDE's default

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000                  # linear lr warm-up steps (score_sde)
    optim.grad_clip = 1.0                # max global grad norm; < 0 disables
    return config


TOY_DATASETS = ("moons", "swiss_roll", "8gaussians", "checkerboard", "rings")


def toy_config(dataset: str = "moons", sde: str = "vpsde") -> ml_collections.ConfigDict:
    """The 2-D toy set-up (``configs/toy/*.py``): a :class:`~sde_diffusion.models.TimeMLP` with eps
    parameterization, continuous DSM with score_sde's weighting, Adam with a short warm-up.
    Trains in about a minute on two CPU cores; see docs/training.md for the measured quality.

    ``sde`` is a name of :data:`sde_diffusion.sdes.SDE_NAMES` (or score_sde's ``vpsde``-style
    spelling, kept as given in ``training.sde``); for VE, ``sigma_max = 4`` (Song & Ermon 2020, technique
    1: about the largest distance between two training points, which lie in roughly [-1, 1]^2).
    """
    require(dataset in TOY_DATASETS, f"dataset must be one of {TOY_DATASETS}, got {dataset!r}")
    canonical_sde_name(sde)
    config = default_config()
    config.seed = 0

    training = config.training
    training.sde = sde
    training.continuous = True
    training.batch_size = 512
    training.n_iters = 4000
    training.log_freq = 100
    training.snapshot_freq_for_preemption = 1000
    training.sample_freq = 0
    training.n_preview = 1000

    config.sampling.method = "euler_maruyama"
    config.sampling.steps = 500
    config.eval.n_samples = 5000
    config.eval.batch_size = 5000

    config.data.dataset = dataset
    config.data.n_train = 20000

    model = config.model
    model.name = "mlp"
    model.parameterization = "eps"
    model.time_input = "t"
    model.ema_rate = 0.999
    model.sigma_min = 0.01
    model.sigma_max = 4.0
    # TimeMLP constructor arguments
    model.hidden = 128
    model.depth = 3
    model.time_embedding = "fourier"
    model.embed_dim = 64
    model.fourier_scale = 16.0
    model.num_classes = None
    model.activation = "silu"

    optim = config.optim
    optim.lr = 2e-3
    optim.warmup = 200
    optim.grad_clip = 1.0
    return config


def digits_config(sde: str = "vpsde") -> ml_collections.ConfigDict:
    """sklearn's 8x8 digits (``configs/digits/*.py``) with a small DDPM++-style
    :class:`~sde_diffusion.models.UNet` (0.7 M parameters), sized to train on a CPU in under
    30 minutes (6000 steps of batch 128; see docs/training.md for the measured quality)."""
    canonical_sde_name(sde)
    config = default_config()
    config.seed = 0

    training = config.training
    training.sde = sde
    training.continuous = True
    training.reduce_mean = True
    training.batch_size = 128
    training.n_iters = 6000
    training.log_freq = 100
    training.snapshot_freq = 2000
    training.snapshot_freq_for_preemption = 500
    training.sample_freq = 2000
    training.n_preview = 64

    config.sampling.method = "euler_maruyama"
    config.sampling.steps = 500
    config.eval.n_samples = 2000
    config.eval.batch_size = 500

    config.data.dataset = "digits"
    config.data.image_size = 8
    config.data.split = "train"

    model = config.model
    model.name = "unet"
    model.parameterization = "eps"
    model.time_input = "t"
    model.ema_rate = 0.999
    model.sigma_max = 12.0   # ~ the largest distance between two 8x8 digits scaled to [-1, 1]
    # UNet constructor arguments
    model.base_channels = 32
    model.channel_mults = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.1
    model.time_embedding = "fourier"
    model.embed_dim = None
    model.fourier_scale = 16.0
    model.skip_rescale = True
    model.num_classes = None
    model.resblock_updown = False
    model.activation = "silu"

    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 500
    optim.grad_clip = 1.0
    return config


def cifar10_config(sde: str = "vpsde") -> ml_collections.ConfigDict:
    """What score_sde's continuous CIFAR-10 recipes share (``configs/cifar10/*.py``; score_sde's
    ``default_cifar10_configs.py``, Song et al. 2021): batch 128, 1.3 M iterations, the N = 1000
    grid, a DDPM++/NCSN++-sized :class:`~sde_diffusion.models.UNet` (nf 128, ch_mult (1, 2, 2, 2),
    4 residual blocks, attention at 16x16, BigGAN-style resampling, skip rescaling, dropout 0.1) with
    eps parameterization, Adam 2e-4 with warm-up 5000 and gradient clip 1. The recipe files set what
    differs between VP and VE (loss reduction, sampler, EMA rate, time conditioning)."""
    canonical_sde_name(sde)
    config = default_config()
    config.seed = 42

    training = config.training
    training.sde = sde
    training.continuous = True
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.snapshot_freq_for_preemption = 10000
    training.sample_freq = 0

    config.sampling.steps = 1000          # model.num_scales: score_sde samples on the N-step grid
    config.sampling.noise_removal = True
    config.eval.n_samples = 50000
    config.eval.batch_size = 1024

    data = config.data
    data.dataset = "cifar10"
    data.path = "data"                    # holds cifar-10-batches-py; --config.data.path=...
    data.split = "train"
    data.image_size = 32
    data.num_channels = 3

    model = config.model
    model.name = "unet"
    model.parameterization = "eps"        # score = -eps / sigma: score_sde's output / sigma
    model.num_scales = 1000
    model.beta_min, model.beta_max = 0.1, 20.0
    model.sigma_min, model.sigma_max = 0.01, 50.0
    # UNet (DDPM++ / NCSN++ trunk): nf = 128, ch_mult (1, 2, 2, 2), 4 res blocks, attention at 16
    model.base_channels = 128
    model.channel_mults = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.skip_rescale = True
    model.resblock_updown = True          # score_sde's resblock_type = "biggan"
    model.num_classes = None
    model.activation = "silu"             # swish

    optim = config.optim
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1, optim.beta2, optim.eps = 0.9, 0.999, 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0
    return config


def check_p_uncond(config) -> float:
    """``config.training.p_uncond`` checked: in ``[0, 1)``, and ``> 0`` only for a conditional
    score model (``config.model.num_classes`` set, ``training.task = "score"``)."""
    p = config.training.get("p_uncond", 0.0)
    require(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= float(p) < 1.0,
            f"config.training.p_uncond (label dropout probability) must lie in [0, 1), got {p!r}")
    if float(p) > 0:
        require((config.get("model", None) or {}).get("num_classes", None) is not None,
                f"config.training.p_uncond={p} drops labels, but the model is unconditional: set "
                f"config.model.num_classes (the number of classes) or p_uncond=0")
        require(str(config.training.get("task", "score")) == "score",
                f"config.training.p_uncond={p} is for score models (classifier-free guidance); a "
                f"classifier trains on every label: set p_uncond=0")
    return float(p)


#: score-network fields a classifier network does not take (dropped by :func:`classifier_config`).
_SCORE_ONLY_FIELDS = ("resblock_updown",)


def classifier_config(config: ml_collections.ConfigDict, num_classes: int) -> ml_collections.ConfigDict:
    """A copy of the score-model ``config`` (``mlp`` or ``unet``) turned into the config of a
    noise-conditional classifier of the same data and SDE: ``training.task = "classifier"``,
    ``model.name`` ``mlp_classifier`` / ``unet_classifier`` with the same width, depth and time
    embedding, ``model.num_classes = num_classes``, no label dropout and no previews. The
    classifier trains with cross-entropy on ``x_t`` at ``t ~ U[training.eps, T]`` (Dhariwal &
    Nichol 2021, Sec. 4)."""
    require(isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2,
            f"num_classes must be an integer >= 2, got {num_classes!r}")
    name = str(config.model.name)
    require(name in ("mlp", "unet"), f"classifier_config turns an 'mlp' or 'unet' config into a "
                                     f"classifier's, got model.name={name!r}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.training.task = "classifier"
    c.training.p_uncond = 0.0
    c.training.sample_freq = 0
    c.training.continuous = True
    c.training.likelihood_weighting = False
    c.training.importance_sampling = False
    with c.model.unlocked() if hasattr(c.model, "unlocked") else contextlib.nullcontext():
        for key in _SCORE_ONLY_FIELDS:
            if key in c.model:
                del c.model[key]
        if "num_classes" in c.model:
            del c.model["num_classes"]
    c.model.name = name + "_classifier"
    c.model.num_classes = num_classes
    return c


# ---- loading ------------------------------------------------------------------------------------
def load_config(path: Union[str, os.PathLike]) -> ml_collections.ConfigDict:
    """Import the Python file ``path`` and return its ``get_config()``.

    A config file is the user's own Python code: importing it runs that code (as with score_sde's
    ``--config`` flag). Checkpoints, by contrast, store configs as plain JSON.
    """
    path = os.fspath(path)
    require(os.path.isfile(path), f"config file not found: {path!r}")
    name = "_sde_diffusion_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    require(spec is not None and spec.loader is not None, f"cannot import config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    require(hasattr(module, "get_config"), f"config file {path!r} defines no get_config()")
    config = module.get_config()
    require(isinstance(config, ml_collections.ConfigDict),
            f"get_config() of {path!r} must return an ml_collections.ConfigDict, "
            f"got {type(config).__name__}")
    return config


# ---- flattening and JSON ----------------------------------------------------------------------
def flatten(config: Mapping, prefix: str = "") -> Dict[str, Any]:
    """``{"optim.lr": 2e-4, ...}``: every leaf of a (nested) config by its dotted name."""
    out: Dict[str, Any] = {}
    for key in config.keys():
        value = config[key]
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """Plain JSON text of a config (tuples become lists), for checkpoints: no pickle."""
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of :func:`config_to_json`; lists come back as tuples (configs use tuples)."""
    return ml_collections.ConfigDict(_tuples(json.loads(text)))


# ---- overrides ----------------------------------------------------------------------------------
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _type_name(value) -> str:
    return type(value).__name__


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _convert(key: str, current, value, from_string: bool):
    """``value`` converted to the type of the field's ``current`` value, or ValueError."""

    def bad(expected: str):
        return ValueError(f"config key {key!r} expects {expected}, got {value!r} "
                          f"({'a string' if from_string else _type_name(value)})")

    if current is None:  # untyped field (e.g. num_classes=None): take the literal's own type
        if from_string:
            return None if value.strip().lower() == "none" else _literal(value)
        return value
    if (value is None and not from_string) or (from_string and value.strip().lower() == "none"):
        if key.rsplit(".", 1)[-1] in NULLABLE_FIELDS:
            return None
        raise bad(f"a value of type {_type_name(current)} (None is not allowed here)")
    if isinstance(current, bool):
        if from_string:
            word = value.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise bad("a bool (true/false)")
        if isinstance(value, bool):
            return value
        raise bad("a bool")
    if isinstance(current, int):
        parsed = _literal(value) if from_string else value
        if isinstance(parsed, bool):
            raise bad("an int")
        if isinstance(parsed, int):
            return parsed
        if isinstance(parsed, float) and parsed.is_integer() and from_string:
            return int(parsed)  # "1e4" on the command line
        raise bad("an int")
    if isinstance(current, float):
        parsed = _literal(value) if from_string else value
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            return float(parsed)
        raise bad("a float")
    if isinstance(current, str):
        if from_string:
            parsed = _literal(value)
            return parsed if isinstance(parsed, str) else value.strip()
        if isinstance(value, str):
            return value
        raise bad("a str")
    if isinstance(current, (tuple, list)):
        if from_string:
            text = value.strip()
            parsed = _literal(text)
            if not isinstance(parsed, (tuple, list)):
                if text in ("", "()", "[]"):
                    parsed = ()
                elif "," in text or not isinstance(parsed, str):
                    parsed = tuple(_literal(p.strip()) for p in text.strip("()[]").split(",")
                                   if p.strip())
                else:
                    raise bad(f"a {_type_name(current)}")
        else:
            parsed = value
        if not isinstance(parsed, (tuple, list)):
            raise bad(f"a {_type_name(current)}")
        if len(current) > 0:  # check the element type against the default's elements
            proto = current[0]
            parsed = [_convert(f"{key}[{i}]", proto, v, from_string=False)
                      for i, v in enumerate(parsed)]
        return type(current)(parsed)
    # any other type: must match exactly
    if isinstance(value, type(current)):
        return value
    raise bad(f"a {_type_name(current)}")


def parse_overrides(overrides: Union[Mapping[str, Any], Iterable[str]]) -> List[Tuple[str, Any, bool]]:
    """Normalise overrides into ``(dotted_key, value, value_is_string)`` triples.

    Accepts a mapping ``{"optim.lr": 1e-3}`` (typed values) or command-line words:
    ``--config.optim.lr=1e-3``, ``config.optim.lr=1e-3``, ``optim.lr=1e-3`` or the two-word form
    ``--config.optim.lr 1e-3``.
    """
    if isinstance(overrides, Mapping):
        return [(str(k), v, False) for k, v in overrides.items()]
    words = list(overrides)
    out: List[Tuple[str, Any, bool]] = []
    i = 0
    while i < len(words):
        word = words[i]
        require(isinstance(word, str), f"an override must be a string, got {word!r}")
        if "=" in word:
            key, value = word.split("=", 1)
            i += 1
        else:
            require(i + 1 < len(words),
                    f"override {word!r} has no value: write {word}=VALUE")
            key, value = word, words[i + 1]
            i += 2
        key = key.lstrip("-")
        if key.startswith("config."):
            key = key[len("config."):]
        require(key != "", f"empty override key in {word!r}")
        out.append((key, value, True))
    return out


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Union[Mapping[str, Any], Iterable[str], None]) -> ml_collections.ConfigDict:
    """Set fields of ``config`` in place (and return it) from dotted-name overrides.

    Values given as strings (command line) are parsed into the field's type: bools accept
    ``true/false/1/0/yes/no``, ints reject fractions, floats accept ints, tuples accept
    ``"(1,2,2)"`` or ``"1,2,2"``; a field whose default is ``None`` takes the literal's own type.
    Typed values (a mapping) must match the field's type (an int is accepted for a float field).
    Raises ``ValueError`` for an unknown key (listing the closest valid keys), for a key naming a
    whole section, and for a value of the wrong type (naming key, expected type and value).
    """
    if overrides is None:
        return config
    valid = flatten(config)
    sections = _sections(config)
    for key, value, from_string in parse_overrides(overrides):
        if key not in valid:
            if key in sections:
                raise ValueError(f"config key {key!r} is a section, not a field: override its "
                                 f"fields, e.g. {key}.{next(iter(config[key].keys()), 'name')}=...")
            close = difflib.get_close_matches(key, list(valid), n=5, cutoff=0.5)
            if not close:  # same last component, other section
                last = key.rsplit(".", 1)[-1]
                close = [k for k in valid if k.rsplit(".", 1)[-1] == last][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint} (valid keys: "
                             f"{', '.join(sorted(valid))})")
        new = _convert(key, valid[key], value, from_string)
        _set(config, key, new)
        valid[key] = new
    return config


def _sections(config: Mapping, prefix: str = "") -> set:
    out = set()
    for key in config.keys():
        if isinstance(config[key], (ml_collections.ConfigDict, dict)):
            out.add(prefix + key)
            out |= _sections(config[key], prefix + key + ".")
    return out


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    if node[last] is None or value is None:
        # ml_collections types a None field on first assignment; re-create the field to retype it
        with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
            del node[last]
            node[last] = value
    else:
        node[last] = value


# ---- builders -----------------------------------------------------------------------------------
#: SDE constructor arguments that ``config.model`` holds under another name (score_sde's layout);
#: every other argument is read from the ``config.model`` field of the same name.
_SDE_FIELDS = {"N": "num_scales", "eps": "sde_eps"}


def build_sde(config: ml_collections.ConfigDict) -> SDE:
    """The forward SDE named by ``config.training.sde`` (a name of
    :data:`sde_diffusion.sdes.SDE_NAMES`, or score_sde's ``vpsde``, ``vpsde_cosine``, ``subvpsde``,
    ``vesde``) with its parameters from ``config.model`` (score_sde's layout): every constructor
    argument of that SDE found there under its own name (``beta_min``, ``beta_max``,
    ``sigma_min``, ``sigma_max``, ``cosine_s``, ``cosine_t_max``), ``num_scales`` as ``N`` and
    ``sde_eps`` as ``eps`` (0 keeps the SDE's default: 1e-3 VP/sub-VP, 1e-5 VE). Arguments the
    SDE does not take (``sigma_max`` for VP, ``cosine_s`` for the linear schedule) are not read."""
    try:
        name = canonical_sde_name(config.training.sde)
    except ValueError as err:
        raise ValueError(f"config.training.sde must be one of the SDE names: {err}") from None
    m = config.model
    params = {}
    for arg in make_sde(name).to_dict():   # the arguments this kind of SDE takes
        key = _SDE_FIELDS.get(arg, arg)
        if arg != "name" and key in m and m[key] is not None:
            params[arg] = m[key]
    if "N" in params:
        params["N"] = int(params["N"])
    if not float(params.get("eps", 0.0) or 0.0) > 0:
        params.pop("eps", None)
    return make_sde(name, **params)


def network_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.model`` without the keys that are not network constructor arguments
    (:data:`MODEL_KEYS`): what ``sde_diffusion.models.build_network`` receives."""
    d = {k: model_config[k] for k in model_config.keys() if k not in MODEL_KEYS}
    return ml_collections.ConfigDict(d)
