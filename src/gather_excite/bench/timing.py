"""Interleaved timing and paired ratios: figures that a machine shared with other jobs disturbs little.

The compared steps run in rounds whose order rotates every round, so a slow spell of the machine
falls on all of them alike; a ratio is taken within each round (:func:`paired_ratio`), which
cancels the machine's slow drifts that a ratio of two medians keeps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["CLOCKS", "paired_ratio", "time_interleaved", "time_samples"]

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_samples(
    steps: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds of every call of each step, one per round; the steps' order rotates every round.

    ``clock="cpu"`` counts the process's CPU time instead of wall-clock time: on a machine
    shared with other jobs it is far less disturbed by them (use one thread, so that no time
    is spent spinning in a thread pool).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    timer = CLOCKS[clock]
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = timer()
            steps[name]()
            times[name].append(timer() - start)
    return times


def time_interleaved(
    steps: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call of each step (see :func:`time_samples`)."""
    samples = time_samples(steps, repeats=repeats, warmup=warmup, clock=clock)
    return {name: statistics.median(values) for name, values in samples.items()}


def paired_ratio(samples: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    """Median and quartiles of ``name``'s time over ``base``'s time within each round.

    Ratios of runs taken minutes apart cancel the machine's slow drifts (other jobs, clock
    boosts), which a ratio of the two medians does not.
    """
    ratios = sorted(a / b for a, b in zip(samples[name], samples[base], strict=True))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3
