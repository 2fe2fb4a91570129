"""Argument checks shared by the operators and networks: each error names the argument and what was expected."""

from __future__ import annotations

import torch

__all__ = ["accumulate_dtype", "check_extent", "check_input", "check_int", "pair"]


def check_int(value: object, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; raises naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_extent(extent: object) -> int | None:
    """``None`` (global) or an int power of two >= 2."""
    if extent is None:
        return None
    if isinstance(extent, bool) or not isinstance(extent, int):
        raise TypeError(f"extent must be None (global) or an int power of two >= 2, got {extent!r}")
    if extent < 2 or extent & (extent - 1):
        raise ValueError(f"extent must be None (global) or a power of two >= 2 (e.g. 2, 4, 8), got {extent}")
    return extent


def pair(value: object, name: str) -> tuple[int, int]:
    """An int or a pair of ints >= 1, as ``(h, w)``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        h, w = value
    else:
        h = w = value
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1 or a pair (h, w) of them, got {value!r}")
    return int(h), int(w)


def check_input(x: object, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be a 4D tensor (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"input has {x.shape[1]} channels but the module was built with channels={channels}")
    if x.shape[2] == 0 or x.shape[3] == 0:  # each gather failed its own way (or returned an empty gate)
        raise ValueError(f"input has an empty spatial size {x.shape[2]}x{x.shape[3]}; expected at least 1x1")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16 (so sums and the gate cannot overflow), else ``dtype`` itself."""
    return torch.promote_types(dtype, torch.float32)
