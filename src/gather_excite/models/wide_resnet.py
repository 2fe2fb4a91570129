"""Wide residual networks (Zagoruyko & Komodakis 2016): WRN-d-k, pre-activation basic units.

WRN-d-k has (d-4)/6 units a stage and widths 16k/32k/64k; the two 3x3 convs of a unit may have
dropout between them. It is the basic-unit :class:`PreActResNet` with those widths.
"""

from __future__ import annotations

from ._builder import check_int
from .preact_resnet import PreActResNet

__all__ = ["WideResNet", "wrn16_8"]


class WideResNet(PreActResNet):
    """WRN-``depth``-``widen_factor`` with one pluggable context module in every unit.

    Args:
        depth: 6n+4 (16, 22, 28, 40, ...): n units a stage.
        widen_factor: k, the width multiplier of the three stages (16k, 32k, 64k).
        dropout: dropout rate between the two convs of a unit.
        **kwargs: ``num_classes``, ``in_chans``, ``input_size``, ``context_layer`` as in
            :class:`PreActResNet`.
    """

    def __init__(self, depth: int = 16, *, widen_factor: int = 8, dropout: float = 0.0, **kwargs: object) -> None:
        check_int(depth, "depth", minimum=10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        check_int(widen_factor, "widen_factor")
        for reserved in ("unit", "widths", "units_per_stage"):
            if reserved in kwargs:
                raise TypeError(f"WideResNet sets {reserved} from depth and widen_factor; do not pass {reserved}")
        super().__init__(
            depth,
            unit="basic",
            widths=tuple(16 * widen_factor * 2**i for i in range(3)),
            units_per_stage=(depth - 4) // 6,
            dropout=dropout,
            **kwargs,
        )


def wrn16_8(**kwargs: object) -> WideResNet:
    """WRN-16-8 (2 units a stage, widths 128/256/512), the paper's Table 5 network."""
    return WideResNet(16, widen_factor=8, **kwargs)
