"""Feature maps that every backbone exposes: ``feature_info`` and its residual units by stage.

Every backbone has ``feature_info``: one dict per exposed feature map, with ``module`` (the
dotted name of the submodule that outputs it), ``num_chs``, ``reduction`` (its stride w.r.t.
the input) and ``stage`` (the paper's label, e.g. ``"conv4_x"``), after timm's idea; and
``stage_names``, the paper's stage labels mapped to the ``nn.Sequential`` whose children are
that stage's residual units.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

from torch import nn

from ..errors import ConfigError

__all__ = ["FeatureInfo", "feature", "residual_units"]


class FeatureInfo(TypedDict):
    """One exposed feature map of a backbone."""

    module: str
    num_chs: int
    reduction: int
    stage: str


def feature(module: str, *, num_chs: int, reduction: int, stage: str) -> FeatureInfo:
    """A ``feature_info`` entry."""
    return FeatureInfo(module=module, num_chs=num_chs, reduction=reduction, stage=stage)


def residual_units(model: nn.Module, stage: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted name, unit)`` of every residual unit, in forward order, optionally of one ``stage``.

    ``stage`` is a key of ``model.stage_names`` (e.g. ``"conv4_x"``) or the module path of an
    ``nn.Sequential`` whose children are the units. Each unit of a backbone has a ``context``
    submodule (``nn.Identity`` when the model has no context module), which is how a named stage's
    children are recognised as units: the path of a unit or a layer would otherwise walk its layers
    (convs, BNs, the pre-ReLU maps) as if they were units.
    """
    stage_names: dict[str, str] | None = getattr(model, "stage_names", None)
    if stage is None:
        if not isinstance(stage_names, dict):
            raise TypeError(f"model must expose stage_names (a dict), got {type(model).__name__}")
        paths = list(stage_names.values())
    elif not isinstance(stage, str):
        raise TypeError(f"stage must be a str, got {stage!r}")
    elif stage_names and stage in stage_names:
        paths = [stage_names[stage]]
    else:
        try:
            module = model.get_submodule(stage)
        except AttributeError:
            module = None
        if module is None or module is model:  # get_submodule("") is the model itself
            raise ConfigError(
                f"stage must be one of the model's stages {sorted(stage_names or ())} or a module path, got {stage!r}"
            )
        paths = [stage]
    for path in paths:
        children = list(model.get_submodule(path).named_children())
        if stage is not None:
            if not children:
                raise ConfigError(f"stage {stage!r} (module {path!r}) has no child units")
            other = next(((n, c) for n, c in children if not isinstance(c._modules.get("context"), nn.Module)), None)
            if other is not None:
                raise ConfigError(
                    f"stage {stage!r} (module {path!r}) is not a stage of residual units: its child {other[0]!r} "
                    f"({type(other[1]).__name__}) has no context module; expected one of the model's stages "
                    f"{sorted(stage_names or ())} or the module path of the nn.Sequential holding a stage's units"
                )
        for child, unit in children:
            yield f"{path}.{child}", unit
