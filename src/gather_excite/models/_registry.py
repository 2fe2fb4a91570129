"""Model names: ``<context spec>_<backbone>``, e.g. ``ge_theta_e8_resnet50``; a bare backbone is the baseline.

Every context spec of :mod:`gather_excite.layers` (``se``; ``ge_theta_minus``, ``ge_theta_minus_max``,
``ge_theta``, ``ge_theta_plus`` at global extent and with ``_e2``/``_e4``/``_e8``) names a model with
every backbone; the backbones are the paper's networks plus ResNet-20/56 for quick CIFAR-style runs.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import typing
from collections.abc import Callable

from torch import nn

from ..errors import ConfigError
from ..layers import context_specs
from .cifar_resnet import cifar_resnet20, cifar_resnet56, cifar_resnet110
from .preact_resnet import cifar_resnet164
from .resnet import resnet50, resnet101, resnet152
from .shufflenet import shufflenet_g3
from .wide_resnet import wrn16_8

__all__ = ["BACKBONES", "CONTEXT_NAMES", "MODELS", "create_model", "list_models", "split_model_name"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "shufflenet_g3": shufflenet_g3,
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet56": cifar_resnet56,
    "cifar_resnet110": cifar_resnet110,
    "cifar_resnet164": cifar_resnet164,
    "wrn16_8": wrn16_8,
}

CONTEXT_NAMES: tuple[str, ...] = tuple(spec.name for spec in context_specs())

# model name -> (backbone, context spec or None)
MODELS: dict[str, tuple[str, str | None]] = {}
for _backbone in BACKBONES:
    MODELS[_backbone] = (_backbone, None)
    for _context in CONTEXT_NAMES:
        MODELS[f"{_context}_{_backbone}"] = (_backbone, _context)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered by an ``fnmatch`` pattern (e.g. ``"*resnet50"``)."""
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be an fnmatch pattern str or None, got {pattern!r}")
    names = sorted(MODELS)
    return names if pattern is None else fnmatch.filter(names, pattern)


def split_model_name(name: str) -> tuple[str, str | None]:
    """``(backbone, context spec or None)`` of a registered model name."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__} ({name!r})")
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown model name {name!r}.{hint} See gather_excite.list_models().") from None


def default_input_size(name: str) -> tuple[int, int]:
    """The input size a registered model is built for by default: 224 for the ImageNet networks, 32 for
    the CIFAR ones (the backbone class's ``default_input_size``, read from its factory's return type)."""
    backbone, _ = split_model_name(name)
    backbone_class = typing.get_type_hints(BACKBONES[backbone])["return"]
    size = backbone_class.default_input_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def create_model(
    name: str,
    num_classes: int | None = None,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    pretrained_file: str | os.PathLike[str] | None = None,
    context_init: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model; ``kwargs`` go to the backbone (``in_chans``, ``input_size``, ...).

    A baseline name accepts a ``context_layer`` keyword (any spec, class or partial); a name
    that already names a context module does not.

    Args:
        num_classes: classifier outputs (default: the weights', else 1000). Other than the
            weights' replaces their classifier, with a warning.
        pretrained: weights to load (a file, a ``gex export`` folder, a URL, ``hf-hub:ORG/REPO``
            or ``torchvision``; see :func:`gather_excite.models._pretrained.read_weights`). The
            constructor arguments recorded with them are the defaults of ``kwargs``.
        pretrained_file: a local copy of what ``pretrained`` would download.
        context_init: ``"identity"`` starts every context module that the weights do not hold
            (all of them without weights) so that the network computes the baseline's function,
            as far as the operator allows (see :mod:`gather_excite.models._retrofit`).
    """
    backbone, context = split_model_name(name)
    if context is not None:
        if "context_layer" in kwargs:
            raise ValueError(
                f"model name {name!r} already fixes context_layer={context!r}; pass context_layer "
                f"only with a baseline name such as {backbone!r}"
            )
        kwargs["context_layer"] = context
    if pretrained is not None or pretrained_file is not None:
        from ._pretrained import create_pretrained

        return create_pretrained(
            name,
            BACKBONES[backbone],
            backbone=backbone,
            context=context,
            num_classes=num_classes,
            pretrained=pretrained if pretrained is not None else pretrained_file,  # type: ignore[arg-type]
            pretrained_file=pretrained_file if pretrained is not None else None,
            context_init=context_init,
            kwargs=kwargs,
        )
    model = BACKBONES[backbone](num_classes=1000 if num_classes is None else num_classes, **kwargs)
    if context_init is not None:
        from ._retrofit import init_context

        init_context(model, context_init)
    # As timm's models carry their pretrained_cfg: the recipe's input size, mean/std and crop (weights,
    # when loaded, bring their own), so that timm.data.resolve_data_config(model=model) agrees with ours.
    from ..data_config import resolve_data_config

    model.pretrained_cfg = resolve_data_config(model).to_dict()
    return model
