"""Construction helpers shared by the backbones: argument checks, feature-size arithmetic, init.

The global-extent gathers need each unit's spatial size. Every backbone derives it from its
``input_size`` argument with :func:`conv_out_size`, layer by layer, as it builds; no stage sizes
are written by hand.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..layers._validate import check_int, pair

__all__ = ["check_int", "conv_out_size", "init_backbone", "pair"]


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
