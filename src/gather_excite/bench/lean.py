"""Switching the lean training path on and off around a benchmarked step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..layers.fused import fused_enabled, set_fused

__all__ = ["fused"]


@contextlib.contextmanager
def fused(enabled: bool) -> Iterator[None]:
    """Run with :func:`bn_context`'s memory-lean path on or off, restoring the previous setting."""
    previous = fused_enabled()
    set_fused(enabled)
    try:
        yield
    finally:
        set_fused(previous)
