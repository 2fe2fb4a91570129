"""Saved-activation memory: the bytes that autograd keeps for the backward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["TrainStep", "peak_bytes", "saved_bytes"]


class TrainStep:
    """A training step split where its forward pass ends: ``forward()`` returns what backward
    starts from, ``finish(output)`` runs backward and the update; calling the step runs both."""

    def __init__(self, forward: Callable[[], torch.Tensor], finish: Callable[[torch.Tensor], None]) -> None:
        self.forward, self.finish = forward, finish

    def __call__(self) -> None:
        self.finish(self.forward())


def saved_bytes(step: Callable[[], object], *, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Bytes that autograd saves for backward during ``step()``, each storage once, parameters excluded.

    For a :class:`TrainStep` only its forward pass counts: the activations held from the end of the
    forward pass into backward. Its ``finish`` runs too, uncounted: what backward records for
    itself (a recomputation, as in ``torch.utils.checkpoint``) lives for one layer's backward.
    """
    skip = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = step.forward() if isinstance(step, TrainStep) else step()
    if isinstance(step, TrainStep):
        step.finish(output)
    return sum(storages.values())


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """How far the CUDA caching allocator's allocated bytes rise above their level before ``step()``
    while it runs: saved activations, gradients and every temporary, as the GPU has to hold them."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
