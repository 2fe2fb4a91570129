"""``context_init="identity"``: context modules that start as the baseline's function.

A Gather-Excite unit multiplies its residual branch by a gate ``sigmoid(logits)`` in (0, 1), so
no gate is exactly 1. What the parametric operators allow instead is a gate that is the same
constant ``c`` for every input: the last layer before the sigmoid gets a zero weight and the
bias ``logit(c)`` (GE-θ and SE/GE-θ+: the gather's last BatchNorm scale or the MLP's last
conv). The layer that feeds the context module (the branch's last BatchNorm, or its last conv
in the pre-activation units) is then scaled by ``1/c``, so that the unit computes exactly the
baseline's output, in training and in evaluation mode.

``c = 0.9`` rather than 0.99: the unit's function is exact either way, but the gate's logits
see a gradient scaled by ``sigmoid'(logit(c)) = c(1 - c)``, 0.09 at 0.9 and ten times less at
0.99, so a gate near saturation would barely learn during fine-tuning.

GE-θ− (average gather, plain excite) has no parameters: its gate is ``sigmoid(mean of the
branch)`` whatever the initialisation, so it cannot start as the identity; it is left as it is
and reported as parameter-free.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.gather import ConvGather, GlobalConvGather
from ..layers.gather_excite import GatherExcite, SqueezeExcite

__all__ = ["CONTEXT_INITS", "IDENTITY_GATE", "context_units", "init_context"]

CONTEXT_INITS = ("identity",)
IDENTITY_GATE = 0.9


def context_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, unit)`` of every module whose child ``context`` is a real context module (not ``nn.Identity``)."""
    units = []
    for name, module in model.named_modules():
        context = module._modules.get("context")
        if context is not None and not isinstance(context, nn.Identity):
            units.append((name, module))
    return units


def _gate_bias_layer(context: nn.Module) -> nn.Module | None:
    """The layer whose output goes straight into the sigmoid (zero weight + bias give a constant gate).

    ``None`` for a parameter-free context (GE-θ−); ``TypeError`` for a module this does not know.
    """
    if isinstance(context, SqueezeExcite) or (isinstance(context, GatherExcite) and context.mlp is not None):
        return context.mlp.fc2
    if isinstance(context, GatherExcite):
        if isinstance(context.gather, GlobalConvGather):
            return context.gather.bn
        if isinstance(context.gather, ConvGather):
            return context.gather.layers[-1]
        return None
    raise TypeError(
        f"context_init='identity' knows GatherExcite and SqueezeExcite, not {type(context).__name__}; "
        "initialise custom context modules yourself"
    )


def _feeding_layer(unit: nn.Module) -> nn.Module:
    """The branch's last BatchNorm2d or Conv2d registered before ``context``: the layer whose output it gates."""
    feeder = None
    for name, child in unit._modules.items():
        if name == "context":
            break
        if isinstance(child, (nn.BatchNorm2d, nn.Conv2d)):
            feeder = child
    if feeder is None:
        raise TypeError(f"{type(unit).__name__} has no BatchNorm2d or Conv2d before its context module")
    return feeder


@torch.no_grad()
def init_context(model: nn.Module, mode: str, *, only: Collection[str] | None = None) -> dict[str, list[str]]:
    """Initialise the context module of every unit of ``model`` (or of the unit names in ``only``) by ``mode``.

    ``mode="identity"``: a constant gate :data:`IDENTITY_GATE` whose factor the feeding layer
    undoes (see the module docstring). Returns ``{"identity": [unit names], "parameter_free":
    [unit names]}``, the latter being the units left as they are (GE-θ−).
    """
    if mode not in CONTEXT_INITS:
        raise ConfigError(f"context_init must be one of {CONTEXT_INITS} or None, got {mode!r}")
    logit = math.log(IDENTITY_GATE / (1 - IDENTITY_GATE))
    report: dict[str, list[str]] = {"identity": [], "parameter_free": []}
    for name, unit in context_units(model):
        if only is not None and name not in only:
            continue
        layer = _gate_bias_layer(unit.context)
        if layer is None:
            report["parameter_free"].append(name)
            continue
        layer.weight.zero_()
        layer.bias.fill_(logit)
        feeder = _feeding_layer(unit)
        feeder.weight.div_(IDENTITY_GATE)
        if feeder.bias is not None:
            feeder.bias.div_(IDENTITY_GATE)
        report["identity"].append(name)
    return report
