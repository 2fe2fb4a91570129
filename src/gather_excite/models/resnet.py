"""ImageNet ResNet-50/101/152 (bottleneck units) with a context module in every chosen unit.

The authors' layout is the original ResNet ("v1"): a downsampling unit puts its stride on the
first 1x1 conv. ``stride_in_1x1=False`` moves it to the 3x3 conv (torchvision's "v1.5"): the
same parameters and state-dict keys as ``torchvision.models.resnet50()``, about 6% more MACs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

import torch
from torch import nn

from ..layers.norm_context import BatchNorm2d, NormContext
from ._backbone import Backbone, BackboneOptions, Stage
from ._builder import UnitOptions, check_int, conv_out_size, unit_context, unit_factory
from ._features import feature

__all__ = ["STAGE_LABELS", "Bottleneck", "ResNet", "resnet50", "resnet101", "resnet152"]

STAGE_LABELS = ("conv2_x", "conv3_x", "conv4_x", "conv5_x")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual unit; ``context`` acts on the branch after ``bn3``, before the sum."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        stride_in_1x1: bool = True,
        **options: Unpack[UnitOptions],
    ) -> None:
        super().__init__()
        dd = unit_factory(type(self), options)
        out_chs = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_chs, planes, 1, stride=stride_1x1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(planes, **dd)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride_3x3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False, **dd)
        self.bn3 = BatchNorm2d(out_chs, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd), nn.BatchNorm2d(out_chs, **dd)
            )
        self.context = unit_context(out_chs, options)
        self.norm_context = NormContext()  # context(bn3(x)), memory-lean in training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.norm_context(self.conv3(out), self.bn3, self.context)
        return self.relu(out + shortcut)


class ResNet(Backbone):
    """ResNet with bottleneck units and one pluggable context module (Section 3 of the paper).

    Args:
        layers: units per stage conv2_x..conv5_x, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        stages: the stages (``"conv2_x"``..``"conv5_x"``) whose units get the context module
            (Table 1); ``None`` means all of them.
        stride_in_1x1: ``True`` the authors' v1 layout, ``False`` torchvision's v1.5.
        options: ``num_classes`` (default 1000), ``input_size`` (default 224), ``in_chans``,
            ``context_layer`` (of the units in ``stages``), ``zero_init_residual``, ``device``,
            ``dtype`` (:class:`BackboneOptions`).
    """

    residual_norm = "bn3"

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        *,
        stages: Sequence[str] | None = None,
        stride_in_1x1: bool = True,
        **options: Unpack[BackboneOptions],
    ) -> None:
        if not isinstance(layers, Sequence) or len(layers) != 4:
            raise ValueError(f"layers must be 4 unit counts (conv2_x..conv5_x), got {layers!r}")
        for count in layers:
            check_int(count, "layers[i]")
        if stages is None:
            stages = STAGE_LABELS
        elif isinstance(stages, str) or not all(s in STAGE_LABELS for s in stages):
            raise ValueError(f"stages must be a list of labels from {STAGE_LABELS} or None, got {stages!r}")
        super().__init__(options)

        self.conv1 = nn.Conv2d(self.in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        size = conv_out_size(self.input_size, kernel=7, stride=2, padding=3)
        self.feature_info.append(feature("relu", num_chs=64, reduction=2, stage="conv1"))
        size = conv_out_size(size, kernel=3, stride=2, padding=1)

        def make_unit(stage: Stage, index: int, in_chs: int, stride: int, size: tuple[int, int]) -> nn.Module:
            return Bottleneck(
                in_chs,
                stage.out_chs // Bottleneck.expansion,
                stride=stride,
                stride_in_1x1=stride_in_1x1,
                context_layer=options.get("context_layer") if stage.label in stages else None,
                feature_size=size,
            )

        # torchvision's module names ("layer1".."layer4"), so that its state dicts load.
        plan = [
            Stage(label, f"layer{index + 1}", count, 64 * 2**index * Bottleneck.expansion, 1 if index == 0 else 2)
            for index, (label, count) in enumerate(zip(STAGE_LABELS, layers, strict=True))
        ]
        self.add_head(self.add_stages(plan, make_unit, in_chs=64, size=size, reduction=4))
        self.finish(options)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The conv5_x feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet50(**kwargs: object) -> ResNet:
    """ResNet-50: (3, 4, 6, 3) bottleneck units."""
    return ResNet((3, 4, 6, 3), **kwargs)


def resnet101(**kwargs: object) -> ResNet:
    """ResNet-101: (3, 4, 23, 3) bottleneck units."""
    return ResNet((3, 4, 23, 3), **kwargs)


def resnet152(**kwargs: object) -> ResNet:
    """ResNet-152: (3, 8, 36, 3) bottleneck units."""
    return ResNet((3, 8, 36, 3), **kwargs)
