"""CIFAR ResNets of He et al. (2016): basic units, widths 16/32/64, depth 6n+2 (ResNet-20/56/110).

Downsampling units use the original paper's parameter-free shortcut ("option A"): subsample
with stride 2 and zero-pad the new channels, so every parameter sits on a residual branch.
"""

from __future__ import annotations

from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.gather import Device
from ..layers.norm_context import BatchNorm2d, NormContext
from ._backbone import Backbone, BackboneOptions, Stage
from ._builder import UnitOptions, check_int, unit_context, unit_factory
from ._features import feature

__all__ = ["BasicUnit", "CifarResNet", "PadShortcut", "cifar_resnet20", "cifar_resnet56", "cifar_resnet110"]


class PadShortcut(nn.Module):
    """Parameter-free shortcut: take every ``stride``-th pixel, zero-pad the extra channels."""

    def __init__(
        self, in_chs: int, out_chs: int, *, stride: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"out_chs must be >= in_chs for a zero-padding shortcut, got {in_chs} -> {out_chs}")
        self.stride = stride
        self.extra = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every stride-th pixel, taken as a 1x1 pooling: its output size is the strided conv's
        # ((H - 1) // stride + 1), written the same way, so a tracer with symbolic sizes sees that
        # the branch and the shortcut match (x[..., ::stride] gives (H + stride - 1) // stride).
        x = F.max_pool2d(x, 1, stride=self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class BasicUnit(nn.Module):
    """3x3 -> 3x3 residual unit; ``context`` acts on the branch after ``bn2``, before the sum."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int = 1,
        **options: Unpack[UnitOptions],
    ) -> None:
        super().__init__()
        dd = unit_factory(type(self), options)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = BatchNorm2d(out_chs, **dd)
        self.context = unit_context(out_chs, options)
        self.norm_context = NormContext()  # context(bn2(x)), memory-lean in training
        self.shortcut = (
            PadShortcut(in_chs, out_chs, stride=stride) if stride != 1 or in_chs != out_chs else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.norm_context(self.conv2(out), self.bn2, self.context)
        return self.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """ResNet for 32x32 images with basic units and one pluggable context module.

    Args:
        depth: 6n+2 layers (n units per stage): 20, 56, 110, ...
        width: channels of the first stage (16 in the paper); the others double it.
        options: ``num_classes`` (default 10), ``input_size`` (default 32), ``in_chans``,
            ``context_layer``, ``zero_init_residual``, ``device``, ``dtype`` (:class:`BackboneOptions`).
    """

    default_num_classes = 10
    default_input_size = 32
    residual_norm = "bn2"

    def __init__(
        self,
        depth: int = 110,
        *,
        width: int = 16,
        **options: Unpack[BackboneOptions],
    ) -> None:
        check_int(depth, "depth", minimum=8)
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        check_int(width, "width")
        super().__init__(options)
        units_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(self.in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.feature_info.append(feature("relu", num_chs=width, reduction=1, stage="conv1"))

        def make_unit(stage: Stage, index: int, in_chs: int, stride: int, size: tuple[int, int]) -> nn.Module:
            return BasicUnit(
                in_chs, stage.out_chs, stride=stride, context_layer=options.get("context_layer"), feature_size=size
            )

        plan = [
            Stage(f"stage{index + 1}", f"stage{index + 1}", units_per_stage, width * 2**index, 1 if index == 0 else 2)
            for index in range(3)
        ]
        self.add_head(self.add_stages(plan, make_unit, in_chs=width, size=self.input_size, reduction=1))
        self.finish(options)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stage3 feature map."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.stage3(self.stage2(self.stage1(x)))


def cifar_resnet20(**kwargs: object) -> CifarResNet:
    """ResNet-20 (3 basic units a stage)."""
    return CifarResNet(20, **kwargs)


def cifar_resnet56(**kwargs: object) -> CifarResNet:
    """ResNet-56 (9 basic units a stage)."""
    return CifarResNet(56, **kwargs)


def cifar_resnet110(**kwargs: object) -> CifarResNet:
    """ResNet-110 (18 basic units a stage), the paper's Table 5 network."""
    return CifarResNet(110, **kwargs)
