"""Saved-activation memory: the bytes that autograd keeps for the backward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["saved_bytes"]


def saved_bytes(step: Callable[[], None], *, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Bytes that autograd saves for backward during ``step()``, each storage once, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())
