"""Switching the lean training path on and off around a benchmarked step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..layers.norm_context import lean_enabled, set_lean

__all__ = ["lean_path"]


@contextlib.contextmanager
def lean_path(enabled: bool) -> Iterator[None]:
    """Run with the memory-lean path of ``NormContext`` allowed or not, restoring the previous setting."""
    previous = lean_enabled()
    set_lean(enabled)
    try:
        yield
    finally:
        set_lean(previous)
