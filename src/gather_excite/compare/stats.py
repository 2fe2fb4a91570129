"""Mean, standard error and paired differences over seeds: the statistics of ``gex compare``'s table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["mean_se", "paired_difference", "resolved"]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, standard error of the mean)``: the SE is the sample standard deviation (n - 1) over sqrt(n).

    One value has no spread to estimate: its SE is ``nan`` (never 0, which would claim certainty).
    """
    if not values:
        raise ValueError("mean_se needs at least one value, got none")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def paired_difference(values: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """``(mean, SE)`` of ``values[i] - base[i]``: the difference to a baseline paired by seed.

    Pairing removes what the runs of one seed share (data order, augmentation stream), so the SE
    is that of the per-seed differences, not a combination of the two variants' own SEs.
    """
    if len(values) != len(base):
        raise ValueError(f"paired_difference needs one value per seed in both, got {len(values)} and {len(base)}")
    return mean_se([value - reference for value, reference in zip(values, base, strict=True)])


def resolved(difference: float, se: float, *, factor: float = 2.0) -> bool:
    """Whether ``|difference| > factor * se`` (the table's mark); never with an unknown (nan) SE."""
    return not math.isnan(se) and abs(difference) > factor * se
