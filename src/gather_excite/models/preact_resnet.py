"""Pre-activation ResNets for 32x32 images (He et al., "Identity Mappings", 2016): ResNet-164.

A pre-activation branch ends with a conv, not a BatchNorm, so its context module acts directly
on that conv's output, before the sum with the identity. A unit that changes the shape has a
1x1 projection shortcut fed by the unit's pre-activated input; its output is not activated (the
next unit's BN-ReLU does that), and the network ends with BN-ReLU before pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import create_context
from ..layers._registry import ContextArg
from ._builder import check_input_size, check_int, conv_out_size, init_backbone
from ._features import FeatureInfo, feature

__all__ = ["PreActBasic", "PreActBottleneck", "PreActResNet", "cifar_resnet164"]


class PreActBottleneck(nn.Module):
    """BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1 (x4 channels); ``context`` before the sum."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        dropout: float = 0.0,
        context_layer: ContextArg = None,
        feature_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.context = create_context(context_layer, out_chs, feature_size=feature_size)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(preact)
        out = self.conv1(preact)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.dropout(self.relu(self.bn3(out))))
        return self.context(out) + shortcut


class PreActBasic(nn.Module):
    """BN-ReLU-3x3 (stride), BN-ReLU-(dropout)-3x3; ``context`` before the sum (the wide ResNet unit)."""

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        dropout: float = 0.0,
        context_layer: ContextArg = None,
        feature_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.context = create_context(context_layer, planes, feature_size=feature_size)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != planes:
            self.shortcut = nn.Conv2d(in_chs, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(preact)
        out = self.conv1(preact)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return self.context(out) + shortcut


_UNITS: dict[str, type[PreActBasic] | type[PreActBottleneck]] = {
    "basic": PreActBasic,
    "bottleneck": PreActBottleneck,
}


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images, three stages, one pluggable context module.

    Args:
        depth: 9n+2 for bottleneck units (164 = 18 a stage), 6n+2 for basic units.
        unit: ``"bottleneck"`` or ``"basic"``.
        widths: the branch widths of the three stages (bottleneck outputs are 4x these).
        stem_width: output channels of the first 3x3 conv.
        units_per_stage: overrides the count derived from ``depth`` (the wide ResNets use it).
        dropout: dropout rate inside every branch (0 disables it).
        num_classes, in_chans: classifier outputs and input channels.
        input_size: the image size (int or ``(h, w)``) the global-extent gathers are sized for.
        context_layer: the context module of every unit (spec string, class, partial, or None).
    """

    def __init__(
        self,
        depth: int = 164,
        *,
        unit: str = "bottleneck",
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int = 16,
        units_per_stage: int | None = None,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
        input_size: int | tuple[int, int] = 32,
        context_layer: ContextArg = None,
    ) -> None:
        super().__init__()
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
        block = _UNITS[unit]
        if units_per_stage is None:
            layers_per_unit = 3 if unit == "bottleneck" else 2
            check_int(depth, "depth", minimum=3 * layers_per_unit + 2)
            if (depth - 2) % (3 * layers_per_unit):
                raise ValueError(
                    f"depth must be {3 * layers_per_unit}n+2 for {unit} units (e.g. "
                    f"{'164' if unit == 'bottleneck' else '110'}), got {depth}"
                )
            units_per_stage = (depth - 2) // (3 * layers_per_unit)
        check_int(units_per_stage, "units_per_stage")
        if len(widths) != 3:
            raise ValueError(f"widths must hold 3 stage widths, got {widths!r}")
        for value in widths:
            check_int(value, "widths[i]")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_int(num_classes, "num_classes")
        check_int(in_chans, "in_chans")
        self.num_classes = num_classes
        self.input_size = check_input_size(input_size)

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        size = self.input_size
        self.feature_info: list[FeatureInfo] = [feature("conv1", num_chs=stem_width, reduction=1, stage="conv1")]
        in_chs, reduction = stem_width, 1
        self.stage_names: dict[str, str] = {}
        for index, planes in enumerate(widths):
            label = f"stage{index + 1}"
            stride = 1 if index == 0 else 2
            size = conv_out_size(size, kernel=3, stride=stride, padding=1)
            reduction *= stride
            units = []
            for unit_index in range(units_per_stage):
                units.append(
                    block(
                        in_chs,
                        planes,
                        stride=stride if unit_index == 0 else 1,
                        dropout=dropout,
                        context_layer=context_layer,
                        feature_size=size,
                    )
                )
                in_chs = planes * block.expansion
            self.add_module(label, nn.Sequential(*units))
            self.stage_names[label] = label
            self.feature_info.append(feature(label, num_chs=in_chs, reduction=reduction, stage=label))
        self.norm = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = in_chs
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        init_backbone(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map after the final BN-ReLU."""
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        return self.relu(self.norm(x))

    def forward_head(self, x: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling and the classifier (or the pooled features if ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def cifar_resnet164(**kwargs: object) -> PreActResNet:
    """Pre-activation ResNet-164 (18 bottleneck units a stage), the paper's Table 5 network."""
    return PreActResNet(164, unit="bottleneck", **kwargs)
