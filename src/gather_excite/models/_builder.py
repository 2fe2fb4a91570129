"""Construction helpers shared by the backbones: argument checks, unit options, feature-size arithmetic, init.

The global-extent gathers need each unit's spatial size. Every backbone derives it from its
``input_size`` argument with :func:`conv_out_size`, layer by layer, as it builds; no stage sizes
are written by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import torch
from torch import nn

from ..layers._registry import ContextArg, create_context
from ..layers._validate import check_int, pair
from ..layers.gather import Device

__all__ = ["UnitOptions", "check_int", "conv_out_size", "init_backbone", "pair", "unit_context", "unit_factory"]


class UnitOptions(TypedDict, total=False):
    """The keyword options every residual unit takes besides its shape; each defaults to ``None``.

    Attributes:
        context_layer: the context module on the unit's branch: a spec string (``"se"``,
            ``"ge_theta_e8"``, ...), a class, a ``functools.partial``, or ``None`` (an identity).
        feature_size: the branch's spatial size ``(h, w)``; the global depthwise gather needs it.
        device, dtype: where and in which dtype the unit's parameters and buffers live (PyTorch's
            factory arguments).
    """

    context_layer: ContextArg
    feature_size: tuple[int, int] | None
    device: Device
    dtype: torch.dtype | None


def unit_factory(unit: type[nn.Module], options: UnitOptions) -> dict[str, object]:
    """The factory arguments (``device``, ``dtype``) of a unit's layers, after checking every option's name."""
    for name in options:
        if name not in UnitOptions.__annotations__:
            # The error Python raises for an explicit keyword-only signature.
            raise TypeError(f"{unit.__name__}.__init__() got an unexpected keyword argument {name!r}")
    return {"device": options.get("device"), "dtype": options.get("dtype")}


def unit_context(channels: int, options: UnitOptions) -> nn.Module:
    """The context module of a unit's branch of ``channels`` channels (see :func:`create_context`)."""
    return create_context(
        options.get("context_layer"),
        channels,
        feature_size=options.get("feature_size"),
        device=options.get("device"),
        dtype=options.get("dtype"),
    )


def conv_out_size(size: tuple[int, int], *, kernel: int, stride: int = 1, padding: int = 0) -> tuple[int, int]:
    """Spatial size after a conv or pooling layer (floor mode), as PyTorch computes it."""
    out = tuple((s + 2 * padding - kernel) // stride + 1 for s in size)
    if min(out) < 1:
        raise ValueError(
            f"input_size is too small: a feature map of {size[0]}x{size[1]} cannot pass a kernel {kernel} "
            f"stride {stride} padding {padding} layer"
        )
    return out[0], out[1]


def _context_subtrees(model: nn.Module) -> set[int]:
    """Ids of every module inside a residual unit's ``context`` module (they own their init)."""
    owned: set[int] = set()
    for name, module in model.named_modules():
        if name.split(".")[-1] == "context":
            owned.update(id(m) for m in module.modules())
    return owned


def init_backbone(model: nn.Module, *, zero_init: Iterable[nn.BatchNorm2d] = ()) -> None:
    """He (fan-out) init of the backbone's convs, unit BN; the context modules keep their own init.

    ``zero_init`` lists BatchNorms whose scale starts at zero: each residual branch then starts
    as the identity, which the torchvision recipe reports gains 0.2-0.3% top-1 (Goyal et al. 2017).
    """
    skip = _context_subtrees(model)
    for module in model.modules():
        if id(module) in skip:
            continue
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for bn in zero_init:
        nn.init.zeros_(bn.weight)
