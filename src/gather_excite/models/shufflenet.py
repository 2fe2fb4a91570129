"""ShuffleNet v1 (Zhang et al. 2018) with a context module in every unit (Table 4 of the paper).

A unit is: grouped 1x1 conv, BN, ReLU, channel shuffle, 3x3 depthwise conv (stride), BN, grouped
1x1 conv, BN; then the context module, then the sum with the identity or, in a stride-2 unit,
the concatenation with a 3x3 average-pooled shortcut; then ReLU. The first 1x1 conv of the
network's first unit is ungrouped (its input has only the stem's 24 channels).
"""

from __future__ import annotations

from typing import Unpack

import torch
from torch import nn

from ..layers.norm_context import BatchNorm2d, NormContext
from ._backbone import Backbone, BackboneOptions, Stage
from ._builder import UnitOptions, conv_out_size, unit_context, unit_factory
from ._features import feature

__all__ = ["STAGE_CHANNELS", "ShuffleNet", "ShuffleUnit", "shufflenet_g3"]

# Stage output channels at width 1x, per number of groups (Table 1 of the ShuffleNet paper).
STAGE_CHANNELS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}
STAGE_REPEATS = (4, 8, 4)
STEM_CHANNELS = 24


class ShuffleUnit(nn.Module):
    """ShuffleNet unit; ``context`` acts on the branch after ``bn3``, before the add or concat."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int,
        groups: int,
        mid_chs: int,
        group_first_conv: bool = True,
        **options: Unpack[UnitOptions],
    ) -> None:
        super().__init__()
        dd = unit_factory(type(self), options)
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"a stride-1 unit needs in_chs == out_chs, got {in_chs} and {out_chs}")
        self.stride = stride
        # A stride-2 unit concatenates its input, so its branch makes only the missing channels.
        branch_chs = out_chs - in_chs if stride == 2 else out_chs
        first_groups = groups if group_first_conv else 1
        for chs, what, divisor in (
            (in_chs, "in_chs", first_groups),
            (mid_chs, "mid_chs", groups),
            (branch_chs, "branch channels", groups),
        ):
            if chs % divisor:
                raise ValueError(f"{what}={chs} is not divisible by groups={divisor}; choose another width")
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, groups=first_groups, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid_chs, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = nn.ChannelShuffle(groups)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(mid_chs, **dd)
        self.conv3 = nn.Conv2d(mid_chs, branch_chs, 1, groups=groups, bias=False, **dd)
        self.bn3 = BatchNorm2d(branch_chs, **dd)
        self.context = unit_context(branch_chs, options)
        self.norm_context = NormContext()  # context(bn3(x)), memory-lean in training
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        out = self.norm_context(self.conv3(out), self.bn3, self.context)
        shortcut = self.shortcut(x)
        if self.stride == 2:
            return self.relu(torch.cat((shortcut, out), dim=1))
        return self.relu(out + shortcut)


class ShuffleNet(Backbone):
    """ShuffleNet v1 with one pluggable context module in every unit.

    Args:
        groups: groups of the pointwise convs (1, 2, 3, 4 or 8).
        width: channel multiplier ("ShuffleNet s x"); every channel count is scaled by it.
        options: ``num_classes`` (default 1000), ``input_size`` (default 224), ``in_chans``,
            ``context_layer``, ``zero_init_residual``, ``device``, ``dtype`` (:class:`BackboneOptions`).
    """

    residual_norm = "bn3"

    def __init__(
        self,
        *,
        groups: int = 3,
        width: float = 1.0,
        **options: Unpack[BackboneOptions],
    ) -> None:
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(STAGE_CHANNELS)}, got {groups!r}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ValueError(f"width must be a positive number (e.g. 0.5, 1.0, 2.0), got {width!r}")
        super().__init__(options)
        stem_chs = int(STEM_CHANNELS * width)
        stage_chs = [int(chs * width) for chs in STAGE_CHANNELS[groups]]

        self.conv1 = nn.Conv2d(self.in_chans, stem_chs, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        size = conv_out_size(self.input_size, kernel=3, stride=2, padding=1)
        self.feature_info.append(feature("relu", num_chs=stem_chs, reduction=2, stage="conv1"))
        size = conv_out_size(size, kernel=3, stride=2, padding=1)

        def make_unit(stage: Stage, index: int, in_chs: int, stride: int, size: tuple[int, int]) -> nn.Module:
            return ShuffleUnit(
                in_chs,
                stage.out_chs,
                stride=stride,
                groups=groups,
                mid_chs=stage.out_chs // 4,
                group_first_conv=not (stage.label == "stage2" and index == 0),
                context_layer=options.get("context_layer"),
                feature_size=size,
            )

        plan = [
            Stage(f"stage{index + 2}", f"stage{index + 2}", repeats, out_chs, 2)
            for index, (out_chs, repeats) in enumerate(zip(stage_chs, STAGE_REPEATS, strict=True))
        ]
        self.add_head(self.add_stages(plan, make_unit, in_chs=stem_chs, size=size, reduction=4))
        self.finish(options)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stage4 feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.stage4(self.stage3(self.stage2(x)))


def shufflenet_g3(**kwargs: object) -> ShuffleNet:
    """ShuffleNet 1x (g = 3), the paper's Table 4 baseline."""
    kwargs.setdefault("groups", 3)
    return ShuffleNet(**kwargs)
