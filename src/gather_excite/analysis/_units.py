"""Name a model's residual units the way the paper does ("conv4_6", "conv5_1", "stage3_2")."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import GateProbe
from ..models import residual_units
from ..models.preact_resnet import PreActUnit

__all__ = ["ActivityTap", "activity_tap", "find_gate_probe", "resolve_unit", "stage_units", "unit_label"]

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
    path of an ``nn.Sequential`` whose children are the units, each with a ``context`` module
    (see :func:`residual_units`, which refuses any other path with a ``ConfigError``).
    """
    units = residual_units(model, stage)
    return {unit_label(stage, index): unit for index, unit in enumerate(units, start=1)}


def resolve_unit(model: nn.Module, unit: str) -> tuple[str, nn.Module]:
    """Module path and module of a unit named by paper label ("conv5_1", "conv5-1") or path."""
    if not isinstance(unit, str):
        raise TypeError(f"unit must be a str, got {unit!r}")
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
    # "" is a user's mistake like any unknown name (get_submodule("") would give the whole model).
    if unit:
        with contextlib.suppress(AttributeError):
            return unit, model.get_submodule(unit)
    labels = [label for stage in names for label in stage_units(model, stage)]
    raise ValueError(f"unit {unit!r} is neither a paper label of this model's units {labels} nor a module path")


@dataclass(frozen=True)
class ActivityTap:
    """Where a unit's post-ReLU activity is read: the output of ``module``, passed through ``activation``."""

    module: nn.Module
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None

    def read(self, output: torch.Tensor) -> torch.Tensor:
        """The activity, from ``module``'s output (out of place: the network's own tensor is left as it is)."""
        return output if self.activation is None else self.activation(output)


def _owner(model: nn.Module, unit: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """The backbone of ``model`` (itself or a submodule) that has ``unit`` among its residual units."""
    for module in model.modules():
        if isinstance(getattr(module, "stage_names", None), dict):
            units = [u for _, u in residual_units(module)]
            if any(u is unit for u in units):
                return module, units
    return None


def activity_tap(model: nn.Module, unit: nn.Module, *, name: str = "unit") -> ActivityTap:
    """Where the post-ReLU activity of ``unit``'s output is read: the first ReLU the network applies to it.

    A v1 unit (ResNet, CIFAR ResNet, ShuffleNet) ends with that ReLU, so its output is the activity.
    A pre-activation unit (:class:`PreActUnit`: ResNet-164, WRN) outputs the bare sum, and the layer the
    network applies to it next is the BN-ReLU that opens the next unit (its ``bn1``) or, after the last
    unit, the final ``norm``-ReLU; the activity is that BN's output after a ReLU, i.e. the activated map
    the next convolutions see (a plain ReLU of the sum would be an activation the network never computes).
    Any other module is read as it is.
    """
    if not isinstance(unit, PreActUnit):
        return ActivityTap(unit)
    owner = _owner(model, unit)
    if owner is None:
        raise ValueError(
            f"{name} is a pre-activation unit, but not a residual unit of a backbone in this model: "
            "the BN-ReLU that activates its output is unknown"
        )
    backbone, units = owner
    index = next(i for i, u in enumerate(units) if u is unit)
    norm = units[index + 1].bn1 if index + 1 < len(units) else getattr(backbone, "norm", None)
    if not isinstance(norm, nn.BatchNorm2d):
        raise ValueError(f"{name}: no BatchNorm after it (the next unit's bn1 or the network's norm) to activate it")
    return ActivityTap(norm, torch.relu)


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
