"""Pre-activation ResNets for 32x32 images (He et al., "Identity Mappings", 2016): ResNet-164.

A pre-activation branch ends with a conv, not a BatchNorm, so its context module acts directly
on that conv's output, before the sum with the identity. A unit that changes the shape has a
1x1 projection shortcut fed by the unit's pre-activated input; its output is not activated (the
next unit's BN-ReLU does that), and the network ends with BN-ReLU before pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

import torch
from torch import nn

from ._backbone import Backbone, BackboneOptions, Stage
from ._builder import UnitOptions, check_int, unit_context, unit_factory
from ._features import feature

__all__ = ["PreActBasic", "PreActBottleneck", "PreActResNet", "PreActUnit", "cifar_resnet164"]


class PreActUnit(nn.Module):
    """A pre-activation unit: BN-ReLU of the input, the branch, ``context`` on the branch, the sum.

    A subclass builds its branch's layers in :meth:`build_branch` and runs them in :meth:`branch`;
    the shortcut is the identity or, where the shape changes, a 1x1 projection of the pre-activated input.
    """

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        dropout: float = 0.0,
        **options: Unpack[UnitOptions],
    ) -> None:
        super().__init__()
        dd = unit_factory(type(self), options)
        out_chs = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.build_branch(in_chs, planes, out_chs, stride=stride, dropout=dropout, dd=dd)
        self.context = unit_context(out_chs, options)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)

    def build_branch(
        self, in_chs: int, planes: int, out_chs: int, *, stride: int, dropout: float, dd: dict[str, object]
    ) -> None:
        """Add the branch's layers (after the shared BN-ReLU ``bn1``), created with the factory arguments ``dd``."""
        raise NotImplementedError

    def branch(self, preact: torch.Tensor) -> torch.Tensor:
        """The residual branch of the pre-activated input, before the context module."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(preact)
        return self.context(self.branch(preact)) + shortcut


class PreActBottleneck(PreActUnit):
    """BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1 (x4 channels); ``context`` before the sum."""

    expansion = 4

    def build_branch(
        self, in_chs: int, planes: int, out_chs: int, *, stride: int, dropout: float, dd: dict[str, object]
    ) -> None:
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(planes, **dd)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False, **dd)

    def branch(self, preact: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn2(self.conv1(preact))))
        return self.conv3(self.dropout(self.relu(self.bn3(out))))


class PreActBasic(PreActUnit):
    """BN-ReLU-3x3 (stride), BN-ReLU-(dropout)-3x3; ``context`` before the sum (the wide ResNet unit)."""

    expansion = 1

    def build_branch(
        self, in_chs: int, planes: int, out_chs: int, *, stride: int, dropout: float, dd: dict[str, object]
    ) -> None:
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, out_chs, 3, padding=1, bias=False, **dd)

    def branch(self, preact: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.dropout(self.relu(self.bn2(self.conv1(preact)))))


STAGE_LABELS = ("stage1", "stage2", "stage3")
_UNITS: dict[str, type[PreActUnit]] = {
    "basic": PreActBasic,
    "bottleneck": PreActBottleneck,
}


class PreActResNet(Backbone):
    """Pre-activation ResNet for small images, three stages, one pluggable context module.

    Args:
        depth: 9n+2 for bottleneck units (164 = 18 a stage), 6n+2 for basic units.
        unit: ``"bottleneck"`` or ``"basic"``.
        widths: the branch widths of the three stages (bottleneck outputs are 4x these).
        stem_width: output channels of the first 3x3 conv.
        units_per_stage: overrides the count derived from ``depth`` (the wide ResNets use it).
        dropout: dropout rate inside every branch (0 disables it).
        options: ``num_classes`` (default 10), ``input_size`` (default 32), ``in_chans``,
            ``context_layer``, ``device``, ``dtype`` (:class:`BackboneOptions`; no
            ``zero_init_residual``: a pre-activation branch ends with a conv).
    """

    default_num_classes = 10
    default_input_size = 32

    def __init__(
        self,
        depth: int = 164,
        *,
        unit: str = "bottleneck",
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int = 16,
        units_per_stage: int | None = None,
        dropout: float = 0.0,
        **options: Unpack[BackboneOptions],
    ) -> None:
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
        super().__init__(options)

        self.conv1 = nn.Conv2d(self.in_chans, stem_width, 3, padding=1, bias=False)
        self.feature_info.append(feature("conv1", num_chs=stem_width, reduction=1, stage="conv1"))

        def make_unit(stage: Stage, index: int, in_chs: int, stride: int, size: tuple[int, int]) -> nn.Module:
            planes = stage.out_chs // block.expansion
            return block(
                in_chs,
                planes,
                stride=stride,
                dropout=dropout,
                context_layer=options.get("context_layer"),
                feature_size=size,
            )

        plan = [
            Stage(label, label, units_per_stage, planes * block.expansion, stride=1 if index == 0 else 2)
            for index, (label, planes) in enumerate(zip(STAGE_LABELS, widths, strict=True))
        ]
        num_features = self.add_stages(plan, make_unit, in_chs=stem_width, size=self.input_size, reduction=1)
        self.norm = nn.BatchNorm2d(num_features)
        self.relu = nn.ReLU(inplace=True)
        self.add_head(num_features)
        self.finish(options)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map after the final BN-ReLU."""
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        return self.relu(self.norm(x))


def cifar_resnet164(**kwargs: object) -> PreActResNet:
    """Pre-activation ResNet-164 (18 bottleneck units a stage), the paper's Table 5 network."""
    return PreActResNet(164, unit="bottleneck", **kwargs)
