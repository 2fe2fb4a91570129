"""Autograd functions behind :func:`~gather_excite.layers.fused.bn_context`.

A residual unit computes ``out = y * gate(y)`` with ``y = BN(z)``. Autograd would keep ``y``
(a full-size tensor, read by the multiply and by the gather) on top of ``z``, which the
BatchNorm keeps anyway. Here two functions split the work at ``y``:

* :class:`BatchNormGather` computes ``y = BN(z)`` and the first, full-size op of the
  gather ``s = first(y)`` (mean, pooling or the first depthwise conv); it keeps ``z``
  and the per-channel statistics.
* :class:`ExciteMultiply` computes ``y * resize(gate)`` and keeps the small gate and ``z``.

Everything between ``s`` and the gate (the gather's BN/ReLU/convs on the reduced map, the
MLP, the sigmoid and the :class:`GateProbe`) stays ordinary autograd on small tensors. In the
backward pass ``y`` is recomputed from ``z`` once (one elementwise pass) and shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchNormGather", "ExciteMultiply", "FirstGather", "RecomputeCache"]


@dataclass
class FirstGather:
    """The gather's first op on the full-size map: its kind and how to apply it.

    ``kind`` is ``"mean"`` (global average), ``"avg_pool"``, ``"conv"`` (depthwise conv with
    the weight passed to :class:`BatchNormGather`) or ``"module"`` (any stateless module,
    differentiated by re-running it on the recomputed ``y``).
    """

    kind: str
    module: nn.Module | None = None
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    accumulate: torch.dtype = torch.float32

    def __call__(self, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "mean":
            return y.mean((2, 3), keepdim=True, dtype=self.accumulate).to(y.dtype)
        if self.kind == "conv":
            return F.conv2d(y, weight, None, self.stride, self.padding, 1, self.groups)
        if self.kind == "avg_pool":
            return F.avg_pool2d(y, self.kernel_size, self.stride, self.padding, count_include_pad=False)
        return self.module(y)


@dataclass
class RecomputeCache:
    """Holds ``y`` recomputed by the excite's backward for the gather's backward (same unit)."""

    y: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def _affine(weight, bias, mean, invstd):  # noqa: ANN001, ANN202
    scale = weight * invstd
    return scale, bias - mean * scale


def _recompute(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    view = (1, -1, 1, 1)
    return torch.addcmul(shift.view(view), z, scale.view(view)).to(dtype)


class BatchNormGather(torch.autograd.Function):
    """``y = batch_norm(z)`` and ``s = first(y)``, keeping only ``z`` and per-channel tensors."""

    @staticmethod
    def forward(  # noqa: PLR0913
        ctx,  # noqa: ANN001
        z: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        gather_weight: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        first: FirstGather,
        cache: RecomputeCache,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, invstd = torch.native_batch_norm(z, weight, bias, running_mean, running_var, training, momentum, eps)
        if not training:
            mean = running_mean
            invstd = torch.rsqrt(running_var + eps)
        scale, shift = _affine(weight, bias, mean, invstd)
        s = first(y, gather_weight)
        ctx.training, ctx.eps, ctx.first, ctx.cache = training, eps, first, cache
        ctx.y_dtype = y.dtype
        ctx.save_for_backward(z, weight, gather_weight, running_mean if not training else None,
                              running_var if not training else None, mean, invstd, scale, shift)
        ctx.mark_non_differentiable(scale, shift)
        return y, s, scale, shift

    @staticmethod
    def backward(ctx, grad_y, grad_s, _gs, _gb):  # noqa: ANN001, ANN205
        z, weight, gather_weight, running_mean, running_var, mean, invstd, scale, shift = ctx.saved_tensors
        first: FirstGather = ctx.first
        cache: RecomputeCache = ctx.cache
        y = cache.y
        cache.y = None
        grad_gather_weight = None
        if grad_s is not None:
            if first.kind == "mean":
                hw = z.shape[-2] * z.shape[-1]
                grad_from_s = (grad_s.to(first.accumulate) / hw).to(ctx.y_dtype).expand_as(z)
            elif first.kind == "avg_pool":
                grad_from_s = torch.ops.aten.avg_pool2d_backward(
                    grad_s, z, [first.kernel_size] * 2, [first.stride] * 2, [first.padding] * 2, False, False, None
                )
            else:
                if y is None:
                    y = _recompute(z, scale, shift, ctx.y_dtype)
                if first.kind == "conv":
                    w = gather_weight.to(grad_s.dtype)
                    grad_from_s, grad_gather_weight, _ = torch.ops.aten.convolution_backward(
                        grad_s, y.to(grad_s.dtype), w, None, [first.stride] * 2, [first.padding] * 2, [1, 1],
                        False, [0, 0], first.groups, [True, ctx.needs_input_grad[3], False],
                    )
                    grad_from_s = grad_from_s.to(ctx.y_dtype)
                    if grad_gather_weight is not None:
                        grad_gather_weight = grad_gather_weight.to(gather_weight.dtype)
                else:
                    with torch.enable_grad():
                        y_leaf = y.detach().requires_grad_()
                        (grad_from_s,) = torch.autograd.grad(first(y_leaf, None), y_leaf, grad_s)
            grad_y = grad_from_s if grad_y is None else grad_y + grad_from_s
        grad_z, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y.contiguous(memory_format=_memory_format(z)), z, weight, running_mean, running_var,
            mean if ctx.training else None, invstd if ctx.training else None, ctx.training, ctx.eps,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        return grad_z, grad_weight, grad_bias, grad_gather_weight, None, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _resize(gate: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if gate.shape[-2:] != size and gate.shape[-2:] != (1, 1):
        return F.interpolate(gate, size=size, mode="nearest")
    return gate


class ExciteMultiply(torch.autograd.Function):
    """``y * nearest_resize(gate)``, keeping the small gate and ``z`` (from which ``y`` is rebuilt)."""

    @staticmethod
    def forward(  # noqa: PLR0913
        ctx,  # noqa: ANN001
        y: torch.Tensor,
        gate: torch.Tensor,
        z: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        cache: RecomputeCache,
        share_y: bool,
    ) -> torch.Tensor:
        ctx.cache, ctx.share_y, ctx.y_dtype = cache, share_y, y.dtype
        ctx.save_for_backward(gate, z, scale, shift)
        return y * _resize(gate, y.shape[-2:]).to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        gate, z, scale, shift = ctx.saved_tensors
        size = z.shape[-2:]
        grad_y = grad_out * _resize(gate, size).to(ctx.y_dtype)
        grad_gate = None
        if ctx.needs_input_grad[1]:
            y = _recompute(z, scale, shift, ctx.y_dtype)
            grad_gate_full = grad_out * y
            if ctx.share_y:
                ctx.cache.y = y
            if gate.shape[-2:] == size:
                grad_gate = grad_gate_full.to(gate.dtype)
            elif gate.shape[-2:] == (1, 1):
                grad_gate = grad_gate_full.sum((2, 3), keepdim=True).to(gate.dtype)
            else:
                grad_gate = torch.ops.aten.upsample_nearest2d_backward(
                    grad_gate_full.to(gate.dtype), list(size), list(gate.shape), None, None
                )
        return grad_y, grad_gate, None, None, None, None, None
