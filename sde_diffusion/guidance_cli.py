"""Class-conditional sampling and guidance on the command line (``sde-diffusion sample --class ...
--guidance ...``): the flags, their checks and the guided model they describe.

The conventions are those of :mod:`sde_diffusion.models.guidance` (docs/guidance.md):

- ``--class C`` alone samples the class-conditional model ``p(x | y=C)`` (one evaluation per call);
- ``--guidance S`` is classifier-free guidance at scale ``s = S`` in
  ``eps_u + s (eps_c - eps_u)`` (Ho & Salimans 2022, Eq. 6, whose weight is ``w = s - 1``): ``1``
  the conditional model, ``0`` the unconditional one, ``> 1`` guided;
- ``--classifier CKPT`` (or ``exact`` on a labelled oracle) makes it classifier guidance,
  ``score + s grad log p_t(y | x)`` (Dhariwal & Nichol 2021; Song et al. 2021, Sec. 5), with
  ``s = --guidance`` (default 1);
- ``--guidance-interval LO,HI`` guides only where ``LO < sigma/alpha <= HI`` (Kynkäänniemi et al.
  2024), ``--guidance-rescale PHI`` is Lin et al. (2024)'s rescale on ``x0``.

Everything here raises ``ValueError`` with a one-line message; the command prints it as
``sde-diffusion: error: ...`` with exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ._checks import require

__all__ = ["add_arguments", "check_arguments", "guided_model", "Guided", "class_rows",
           "parse_classes", "parse_interval", "solver_calls"]

EXACT = "exact"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The class and guidance flags of ``sample``."""
    g = p.add_argument_group("classes and guidance (docs/guidance.md)")
    g.add_argument("--class", dest="classes", default=None, metavar="C",
                   help="the class to sample: one label (3), a list (0,2,5: sample i gets the "
                        "(i mod k)-th) or 'all' (one row per class in the picture); needs a "
                        "class-conditional model, or --classifier")
    g.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="guidance scale s: classifier-free eps_u + s (eps_c - eps_u) (s = 1 + w of "
                        "Ho & Salimans; 1 = the conditional model, 0 = unconditional), or with "
                        "--classifier score + s grad log p(y|x_t) (default 1 there)")
    g.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only where the noise level sigma/alpha lies in (LO, HI] (HI may be "
                        "inf); the conditional model elsewhere")
    g.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                   help="rescaled classifier-free guidance (Lin et al. 2024) with phi in [0, 1], "
                        "on x0")
    g.add_argument("--classifier", default=None, metavar="CKPT",
                   help="classifier guidance with a noise-conditional classifier (a checkpoint "
                        "file or workdir trained with training.task=classifier), or 'exact' for "
                        "an oracle's exact classifier")


def parse_classes(text: str) -> object:
    """``"3"`` -> ``[3]``, ``"0,2,5"`` -> ``[0, 2, 5]``, ``"all"`` -> ``"all"``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    require(len(values) > 0 and min(values) >= 0,
            f"--class {text!r}: give a class (an integer >= 0), a comma-separated list of classes "
            f"or 'all'")
    return values


def parse_interval(text: str) -> Tuple[float, float]:
    """``"LO,HI"`` -> ``(lo, hi)`` with ``0 <= lo < hi`` (``hi`` may be ``inf``)."""
    parts = text.split(",")
    bad = (f"--guidance-interval {text!r}: give LO,HI, two noise levels sigma/alpha with "
           f"0 <= LO < HI (HI may be inf), e.g. 0.3,3 or 1,inf")
    require(len(parts) == 2, bad)
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(bad) from None
    require(math.isfinite(lo) and lo >= 0 and not math.isnan(hi) and hi > lo, bad)
    return lo, hi


def check_arguments(args) -> None:
    """The checks that need no model: run before anything is loaded."""
    classes = None if args.classes is None else parse_classes(args.classes)
    guided = args.guidance is not None or args.classifier is not None
    if guided and classes is None:
        what = "--classifier" if args.guidance is None else "--guidance"
        raise ValueError(f"{what} needs --class, the class to guide towards (e.g. --class 3, "
                         f"--class 0,1 or --class all)")
    if args.guidance is not None:
        require(math.isfinite(args.guidance) and args.guidance >= 0,
                f"--guidance must be a finite scale s >= 0 (s = 1 + w: 1 is the conditional "
                f"model, 0 the unconditional one), got {args.guidance}")
    for flag, value in (("--guidance-interval", args.guidance_interval),
                        ("--guidance-rescale", args.guidance_rescale)):
        if value is not None and not guided:
            raise ValueError(f"{flag} shapes guidance: give --guidance S (and --class)")
    if args.guidance_interval is not None:
        parse_interval(args.guidance_interval)
    if args.guidance_rescale is not None:
        require(args.classifier is None,
                "--guidance-rescale is for classifier-free guidance; leave it out with --classifier")
        require(0 <= args.guidance_rescale <= 1,
                f"--guidance-rescale must lie in [0, 1] (phi of Lin et al. 2024), got "
                f"{args.guidance_rescale}")
    if args.classifier is not None:
        if args.classifier == EXACT:
            require(bool(getattr(args, "oracle", None)),
                    "--classifier exact is the exact classifier of an oracle: use it with --oracle "
                    "(ring8c, gmm64c), or give a classifier checkpoint")
        elif not os.path.exists(args.classifier):
            raise ValueError(f"--classifier {args.classifier!r}: no such file or folder (a "
                             f"classifier checkpoint, or 'exact' with --oracle)")


@dataclass
class Guided:
    """What ``sample`` runs: ``model`` (the plain, conditional or guided model), the per-sample
    ``labels`` (or None), the ``classes`` asked for, a description for the JSON line, and
    warnings to print."""

    model: object
    labels: Optional[torch.Tensor] = None
    classes: List[int] = field(default_factory=list)
    info: Dict[str, object] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    @property
    def evaluations_per_call(self) -> int:
        return int(getattr(self.model, "evaluations_per_call", 1))

    def counts(self) -> Dict[str, int]:
        """The model's counts after sampling: ``network_calls`` (calls of the network, the
        classifier's included) and ``classifier_calls`` for classifier guidance."""
        out = {"network_calls": int(getattr(self.model, "network_calls", self.model.nfe))}
        if hasattr(self.model, "classifier_calls"):
            out["classifier_calls"] = int(self.model.classifier_calls)
        return out


def _class_count(model, mixture) -> Optional[int]:
    if mixture is not None:
        return mixture.n_classes
    return getattr(getattr(model, "net", None), "num_classes", None)


def _source(args) -> str:
    return f"--oracle {args.oracle}" if getattr(args, "oracle", None) else \
        f"--checkpoint {args.checkpoint}"


def _load_classifier(args, sde, device):
    from .checkpoints import classifier_from_checkpoint

    try:
        clf, clf_sde, _ = classifier_from_checkpoint(args.classifier, device=device)
    except ValueError as err:                # a score model's checkpoint, no checkpoint, ...
        raise ValueError(f"--classifier: {err}") from None
    require(clf_sde == sde, f"--classifier {args.classifier!r} was trained on noisy data of "
                            f"{clf_sde!r}, and the model samples {sde!r}: train the classifier "
                            f"under the model's SDE")
    return clf, clf.num_classes


def guided_model(args, model, sde, mixture, config, n: int, device) -> Guided:
    """The model that ``sample`` integrates, from ``--class``, ``--guidance``,
    ``--guidance-interval``, ``--guidance-rescale`` and ``--classifier`` (checked against the
    loaded model: its classes, whether it is conditional at all)."""
    from .models import ClassifierFreeGuidance, ClassifierGuidance

    if args.classes is None:
        return Guided(model)
    classes = parse_classes(args.classes)
    classifier, K = None, _class_count(model, mixture)
    if args.classifier == EXACT:
        require(mixture is not None and mixture.n_classes is not None,
                f"--classifier exact needs an oracle with classes (ring8c, gmm64c); "
                f"{args.oracle} has none")
        classifier = mixture
    elif args.classifier is not None:
        classifier, K = _load_classifier(args, sde, device)
    if K is None:
        flag = "--guidance" if args.guidance is not None else "--class"
        kind = "this mixture has no class labels (labelled oracles: ring8c, gmm64c)" \
            if mixture is not None else \
            "it was trained without classes (config.model.num_classes unset)"
        raise ValueError(f"{flag} needs a class-conditional model, and {_source(args)} is not: "
                         f"{kind}; or guide an unconditional model with --classifier CKPT")
    if classes == "all":
        classes = list(range(K))
    bad = [c for c in classes if c >= K]
    owner = "the classifier's" if args.classifier not in (None, EXACT) else "the model's"
    require(not bad, f"--class {bad[0] if bad else ''} is outside {owner} classes 0..{K - 1}")
    labels = torch.tensor(classes, dtype=torch.long, device=device).repeat(-(-n // len(classes)))[:n]
    interval = None if args.guidance_interval is None else parse_interval(args.guidance_interval)
    info: Dict[str, object] = {"classes": classes}
    warnings: List[str] = []
    if classifier is not None:
        scale = 1.0 if args.guidance is None else float(args.guidance)
        guided = ClassifierGuidance(model, classifier, scale, interval=interval)
        info["guidance"] = {"method": "classifier", "scale": scale,
                            "classifier": args.classifier, "interval": interval}
    elif args.guidance is None:
        guided = model
        info["guidance"] = {"method": "conditional", "scale": 1.0}
    else:
        rescale = args.guidance_rescale or 0.0
        guided = ClassifierFreeGuidance(model, float(args.guidance), interval=interval,
                                        rescale=rescale)
        info["guidance"] = {"method": "classifier-free", "scale": guided.scale, "w": guided.w,
                            "interval": interval, "rescale": rescale, "batched": guided.batched}
        p_uncond = _p_uncond(config)
        if p_uncond == 0.0 and guided.scale != 1.0:
            warnings.append(f"{_source(args)} was trained with training.p_uncond = 0: its "
                            f"unconditional (null-label) prediction was never trained, so "
                            f"guidance at s = {guided.scale:g} mixes in an untrained output")
    bound = guided.bind(y=labels)
    info["evaluations_per_call"] = int(getattr(bound, "evaluations_per_call", 1))
    return Guided(bound, labels, list(classes), info, warnings)


def _p_uncond(config) -> Optional[float]:
    if config is None:
        return None
    try:
        return float(config.training.get("p_uncond", 0.0))
    except (AttributeError, TypeError, ValueError):
        return None


def solver_calls(nfe: int, guided: Guided) -> int:
    """The solver's budget of model calls for ``--nfe`` network evaluations per sample: each call
    of a guided model costs ``evaluations_per_call`` (2) evaluations."""
    per = guided.evaluations_per_call
    calls = nfe // per
    require(calls >= 1, f"--nfe {nfe} buys no call of the guided model, which costs {per} "
                        f"evaluations per call: give --nfe >= {per}")
    return calls


def class_rows(x: torch.Tensor, labels: torch.Tensor, classes: List[int],
               per_row: int = 8) -> Tuple[torch.Tensor, int]:
    """Images ordered for a grid with one row per class (in ``classes``' order, each class once):
    ``(images, images per row)``, the same number of images in every row."""
    seen: List[int] = []
    for c in classes:
        if c not in seen:
            seen.append(c)
    rows = [x[labels.cpu() == c] for c in seen]
    m = min([per_row] + [r.shape[0] for r in rows])
    return torch.cat([r[:m] for r in rows]), max(m, 1)
