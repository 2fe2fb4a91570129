"""Name a model's residual units the way the paper does ("conv4_6", "conv5_1", "stage3_2")."""

from __future__ import annotations

import re

from torch import nn

from ..layers import GateProbe
from ..models import residual_units

__all__ = ["find_gate_probe", "resolve_unit", "stage_units", "unit_label"]

_UNIT_LABEL = re.compile(r"^(?P<stage>.+?)[_-](?P<index>\d+)$")


def _stage_names(model: nn.Module) -> dict[str, str]:
    names = getattr(model, "stage_names", None)
    return dict(names) if names else {}


def unit_label(stage: str, index: int) -> str:
    """The paper's name of the ``index``-th (1-based) unit of ``stage``: conv4_x, 6 -> "conv4_6"."""
    base = stage[:-2] if stage.endswith("_x") else stage
    return f"{base}_{index}"


def stage_units(model: nn.Module, stage: str) -> dict[str, tuple[str, nn.Module]]:
    """The units of a stage by paper label, each with its module path, in forward order.

    ``stage`` is a key of ``model.stage_names`` (e.g. ``"conv4_x"``, ``"stage3"``) or the
    path of an ``nn.Sequential`` whose children are the units (see :func:`residual_units`).
    """
    units = residual_units(model, stage)
    return {unit_label(stage, index): unit for index, unit in enumerate(units, start=1)}


def resolve_unit(model: nn.Module, unit: str) -> tuple[str, nn.Module]:
    """Module path and module of a unit named by paper label ("conv5_1", "conv5-1") or path."""
    if not isinstance(unit, str) or not unit:
        raise TypeError(f"unit must be a non-empty str, got {unit!r}")
    names = _stage_names(model)
    match = _UNIT_LABEL.match(unit)
    if match:
        base, index = match["stage"], int(match["index"])
        for stage in (f"{base}_x", base):
            if stage in names:
                units = list(stage_units(model, stage).values())
                if not 1 <= index <= len(units):
                    raise ValueError(f"unit {unit!r}: stage {stage!r} has units 1..{len(units)}, got {index}")
                return units[index - 1]
    try:
        return unit, model.get_submodule(unit)
    except AttributeError:
        labels = [label for stage in names for label in stage_units(model, stage)]
        raise ValueError(
            f"unit {unit!r} is neither a paper label of this model's units {labels} nor a module path"
        ) from None


def find_gate_probe(unit: nn.Module, *, name: str = "unit") -> GateProbe:
    """The excite gate probe of a unit's context module (``unit.context``)."""
    context = getattr(unit, "context", None)
    if context is None:
        raise ValueError(f"{name} has no `context` attribute: not a residual unit of a gather_excite model")
    probes = [m for m in context.modules() if isinstance(m, GateProbe)]
    if len(probes) != 1:
        raise ValueError(
            f"{name}: its context module {type(context).__name__} has {len(probes)} excite gates, expected 1 "
            "(pruning needs a GE or SE model)"
        )
    return probes[0]
