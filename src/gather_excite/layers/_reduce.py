"""Per-channel reductions of a feature map for the memory-lean path (:mod:`._lean`), fast on the CPU.

CPU's depthwise conv is slow at a map-sized kernel, ``einsum`` copies a channels-last map to NCHW
and ``batch_norm_update_stats`` reads an NCHW map at a fraction of memory speed: the loops here read
the map once, in its own layout, in chunks of samples with a cache-sized temporary. Every other
device takes the generic ops.
"""

from __future__ import annotations

import torch

# False sends CPU tensors through the generic ops too (the tests run those branches on the CPU).
CPU_KERNELS = True
_CHUNK_ELEMENTS = 2**18


def _cpu(x: torch.Tensor) -> bool:
    return CPU_KERNELS and x.device.type == "cpu"


def as_channel(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, -1, 1, 1)


def _chunk(x: torch.Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))


def per_chunk(fn, *maps: torch.Tensor) -> torch.Tensor:
    """``fn`` over a few samples of ``maps`` at a time (on the CPU; whole elsewhere), joined along the batch."""
    step = _chunk(maps[0]) if _cpu(maps[0]) else maps[0].shape[0]
    parts = [fn(*(m[i : i + step] for m in maps)) for i in range(0, maps[0].shape[0], step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def map_dot(x: torch.Tensor, other: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[n, c] = sum_hw x[n, c] * other[(n,) c]`` in ``dtype``, ``other`` ``(C, H, W)`` or ``(N, C, H, W)``."""
    shared = other.dim() == 3
    if not _cpu(x):
        if shared and x.is_contiguous():
            return torch.einsum("nchw,chw->nc", x, other.to(x.dtype)).to(dtype)
        return (x * other).sum((2, 3), dtype=dtype)
    if shared:  # the kernel in the samples' own layout: every product is one straight pass
        other = torch.empty_like(x[0]).copy_(other)
    out, step = torch.empty(x.shape[:2], dtype=dtype, device=x.device), _chunk(x)
    for i in range(0, x.shape[0], step):
        part = other if shared else other[i : i + step]
        torch.sum(x[i : i + step] * part, (2, 3), dtype=dtype, out=out[i : i + step])
    return out


def map_weighted_sum(weight: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[c, h, w] = sum_n weight[n, c] * x[n, c, h, w]`` in ``dtype``; ``(C, H, W)``."""
    if not _cpu(x) and x.is_contiguous():
        return torch.einsum("nc,nchw->chw", weight.to(x.dtype), x).to(dtype)
    weight = weight.to(dtype)[:, :, None, None]
    if not _cpu(x):
        return (x * weight).sum(0, dtype=dtype)
    out = torch.zeros_like(x[0], dtype=dtype)
    for i in range(x.shape[0]):
        out.addcmul_(x[i], weight[i])
    return out


def batch_stats(
    z: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
    accumulate: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Per-channel batch mean and biased variance of ``z``, updating the running averages as
    ``nn.BatchNorm2d`` does, and the per-(sample, channel) means where they come free. On the CPU an
    NCHW map takes two passes, faster than ``batch_norm_update_stats`` there: the (sample, channel)
    means (which a global gather needs), then the squared deviations in chunks (stable variance)."""
    if not (_cpu(z) and z.is_contiguous()):
        mean, var = torch.batch_norm_update_stats(z, running_mean, running_var, momentum)
        return mean, var, None
    n, c, h, w = z.shape
    sample_mean = z.mean((2, 3), dtype=accumulate)
    mean, squares, step = sample_mean.mean(0), torch.zeros(c, dtype=accumulate, device=z.device), _chunk(z)
    for i in range(0, n, step):
        squares += (z[i : i + step] - as_channel(mean)).square_().sum((0, 2, 3), dtype=accumulate)
    if running_mean is not None and running_var is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((squares / max(n * h * w - 1, 1)).to(running_var.dtype), alpha=momentum)
    return mean, squares / (n * h * w), sample_mean
