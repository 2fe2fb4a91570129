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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._validate import accumulate_dtype

__all__ = [
    "BatchNormGather",
    "BatchNormMean",
    "ExciteAffine",
    "ExciteMultiply",
    "FirstGather",
    "GateBroadcast",
    "MeanCache",
    "RecomputeCache",
]


@dataclass
class FirstGather:
    """The gather's first op on the full-size map: its kind and how to apply it.

    ``kind`` is ``"mean"`` (global average), ``"avg_pool"``, ``"conv"`` (depthwise conv with
    the weight passed to :class:`BatchNormGather`), ``"global_conv"`` (a depthwise conv as large
    as the map, no padding; handled by :class:`BatchNormMean`, never called) or ``"module"``
    (any stateless module, differentiated by re-running it on the recomputed ``y``).
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


# A depthwise conv whose kernel covers the map is a per-(sample, channel) dot product. CPU's
# depthwise convolution is slow at that size, and einsum's batched matmul copies a
# channels-last map to NCHW first (about 1 s of a ResNet-50 step); a loop over chunks of
# samples reads the map once, in whatever layout it has, with a cache-sized temporary.
_CHUNK_ELEMENTS = 2**18

# Which kernels run: the CPU-tuned loops (for CPU tensors) or the device-generic ops (einsum,
# multiply-and-sum, batch_norm_update_stats) that every other device takes. Tests set this to
# False to run the device-generic branches on the CPU.
CPU_KERNELS = True


def _cpu_kernels(x: torch.Tensor) -> bool:
    return CPU_KERNELS and x.device.type == "cpu"


def map_dot(x: torch.Tensor, other: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[n, c] = sum_hw x[n, c, h, w] * other[., c, h, w]``, summed in ``dtype``; ``(N, C)``.

    ``other`` is either one ``(C, H, W)`` map shared by all samples (a global depthwise kernel)
    or an ``(N, C, H, W)`` map of its own per sample.
    """
    n, c = x.shape[:2]
    shared = other.dim() == 3
    if not _cpu_kernels(x) and shared and x.is_contiguous():
        return torch.einsum("nchw,chw->nc", x, other.to(x.dtype)).to(dtype)
    if not _cpu_kernels(x):
        return (x * other).sum((2, 3), dtype=dtype)
    if shared:
        # The kernel in the samples' own layout, so that every product is one straight pass.
        other = torch.empty_like(x[0]).copy_(other)
    out = torch.empty(n, c, dtype=dtype, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))
    for i in range(0, n, step):
        torch.sum(x[i : i + step] * (other if shared else other[i : i + step]), (2, 3), dtype=dtype,
                  out=out[i : i + step])  # fmt: skip
    return out


def map_weighted_sum(weight: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[c, h, w] = sum_n weight[n, c] * x[n, c, h, w]``, summed in ``dtype``; ``(C, H, W)``."""
    n, c = x.shape[:2]
    if not _cpu_kernels(x) and x.is_contiguous():
        return torch.einsum("nc,nchw->chw", weight.to(x.dtype), x).to(dtype)
    weight = weight.to(dtype).view(n, c, 1, 1)
    if not _cpu_kernels(x):
        return (x * weight).sum(0, dtype=dtype)
    out = torch.zeros_like(x[0], dtype=dtype)
    for i in range(n):
        out.addcmul_(x[i], weight[i])
    return out


@dataclass
class RecomputeCache:
    """What the excite's backward hands to the gather's backward of the same unit.

    ``y`` is the recomputed BN output (when the gather's backward needs it too);
    ``grad_out``/``gate`` let the gather's backward form ``grad_out * gate + grad_from_gather``
    in one pass instead of the excite returning a full-size ``grad_out * gate`` first.
    """

    y: torch.Tensor | None = None
    grad_out: torch.Tensor | None = None
    excite: GateBroadcast | None = None


def _recompute(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    view = (1, -1, 1, 1)
    return torch.addcmul(shift.view(view), z, scale.view(view)).to(dtype)


def _block(x: torch.Tensor, gate: torch.Tensor) -> tuple[int, int] | None:
    """Integer repeat factors when nearest-resizing ``gate`` to ``x`` repeats each cell as a block."""
    (h, w), (big_h, big_w) = gate.shape[-2:], x.shape[-2:]
    if (h, w) == (1, 1) or big_h % h or big_w % w or not x.is_contiguous():
        return None
    kh, kw = big_h // h, big_w // w
    # Power-of-two factors only: then interpolate's float scale h/H is exact and its
    # nearest source index floor(i * h / H) is exactly i // kh.
    if kh & (kh - 1) or kw & (kw - 1):
        return None
    return kh, kw


def _runs(small: int, big: int) -> torch.Tensor:
    """How many output rows nearest-resizing ``small`` rows to ``big`` gives each input row."""
    source = F.interpolate(torch.arange(small, dtype=torch.float32).view(1, 1, small, 1), size=(big, 1))
    return torch.bincount(source.view(big).long(), minlength=small)


def _nearest(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(gate, size=x.shape[-2:], mode="nearest")``, faster on CPU.

    CPU's nearest resize is slow for NCHW tensors: a channels-last map uses it in channels-last
    form, an NCHW map repeats the gate's rows and columns by the runs that it maps them to.
    """
    (h, w), (big_h, big_w) = gate.shape[-2:], x.shape[-2:]
    if x.is_contiguous() and big_h >= h and big_w >= w:
        rows, cols = _runs(h, big_h).to(gate.device), _runs(w, big_w).to(gate.device)
        return gate.repeat_interleave(cols, dim=3, output_size=big_w).repeat_interleave(rows, dim=2, output_size=big_h)
    if x.is_contiguous(memory_format=torch.channels_last):
        gate = gate.contiguous(memory_format=torch.channels_last)
    return F.interpolate(gate, size=(big_h, big_w), mode="nearest")


class GateBroadcast:
    """``x * nearest_resize(gate)`` and its gate gradient without a full-size copy of the gate.

    A global gate (1 x 1) broadcasts; when the map is an integer multiple of the gate, each
    gate cell covers a block and a view broadcasts it; otherwise ``F.interpolate`` does it,
    as the plain composition does.
    """

    def __init__(self, gate: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
        self.gate, self.size = gate, x.shape[-2:]
        self.block = _block(x, gate)
        cast = gate.to(dtype)
        if self.block is not None:
            # Repeat along W only (1/kh of the map); a view broadcasts over H's block.
            self.factor = cast.repeat_interleave(self.block[1], dim=-1).unsqueeze(3)
        elif gate.shape[-2:] != self.size and gate.shape[-2:] != (1, 1):
            self.factor = _nearest(gate, x).to(dtype)
        else:
            self.factor = cast

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.gate.shape[-2], self.block[0])) if self.block is not None else x

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return (self._view(x) * self.factor).view(x.shape)

    def multiply_add(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + x * gate``; a fresh full-size ``base`` is updated in place."""
        if base.shape == x.shape and base.stride() == x.stride():
            self._view(base).addcmul_(self._view(x), self.factor)
            return base
        if self.block is not None:
            return base + self.multiply(x)
        return torch.addcmul(base, x, self.factor)

    def gate_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gradient of ``sum(grad_out * x * resize(gate))`` with respect to the small gate."""
        gate = self.gate
        product = grad_out * x
        if gate.shape[-2:] == (1, 1) and self.size != (1, 1):
            return product.sum((2, 3), keepdim=True, dtype=gate.dtype)
        if self.block is not None:
            rows = self._view(product).sum(3, dtype=gate.dtype)
            return rows.unflatten(3, (gate.shape[-1], self.block[1])).sum(4)
        if gate.shape[-2:] == self.size:
            return product.to(gate.dtype)
        return torch.ops.aten.upsample_nearest2d_backward(
            product.to(gate.dtype), list(self.size), list(gate.shape), None, None
        )


class BatchNormGather(torch.autograd.Function):
    """``y = batch_norm(z)`` and ``s = first(y)``, keeping only ``z`` and per-channel tensors."""

    @staticmethod
    def forward(
        ctx,
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
        if training and _two_pass_stats(z):
            # The faster NCHW statistics of batch_stats, then one normalising pass.
            mean, var, _ = batch_stats(z, running_mean, running_var, momentum, accumulate_dtype(z.dtype))
            invstd = torch.rsqrt(var + eps)
            y = None
        else:
            y, mean, invstd = torch.native_batch_norm(
                z, weight, bias, running_mean, running_var, training, momentum, eps
            )
        if not training:
            mean = running_mean
            invstd = torch.rsqrt(running_var + eps)
        scale = weight * invstd
        shift = bias - mean * scale
        if y is None:
            y = _recompute(z, scale, shift, z.dtype)
        s = first(y, gather_weight)
        ctx.training, ctx.eps, ctx.first, ctx.cache = training, eps, first, cache
        ctx.y_dtype = y.dtype
        ctx.save_for_backward(z, weight, gather_weight, running_mean if not training else None,
                              running_var if not training else None, mean, invstd, scale, shift)  # fmt: skip
        ctx.mark_non_differentiable(scale, shift)
        ctx.set_materialize_grads(False)
        return y, s, scale, shift

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_s, _grad_scale, _grad_shift):
        z, weight, gather_weight, running_mean, running_var, mean, invstd, scale, shift = ctx.saved_tensors
        first: FirstGather = ctx.first
        cache: RecomputeCache = ctx.cache
        y, grad_out, excite = cache.y, cache.grad_out, cache.excite
        cache.y = cache.grad_out = cache.excite = None
        grad_gather_weight = grad_from_s = None
        if grad_s is not None:
            if first.kind == "mean":
                grad_from_s = (grad_s.to(first.accumulate) / (z.shape[-2] * z.shape[-1])).to(ctx.y_dtype)
            elif first.kind == "avg_pool":
                k, st, p = [first.kernel_size] * 2, [first.stride] * 2, [first.padding] * 2
                grad_from_s = torch.ops.aten.avg_pool2d_backward(grad_s, z, k, st, p, False, False, None)
            else:
                if y is None:
                    y = _recompute(z, scale, shift, ctx.y_dtype)
                if first.kind == "conv":
                    grad_from_s, grad_gather_weight, _ = torch.ops.aten.convolution_backward(
                        grad_s, y.to(grad_s.dtype), gather_weight.to(grad_s.dtype), None, [first.stride] * 2,
                        [first.padding] * 2, [1, 1], False, [0, 0], first.groups,
                        [True, ctx.needs_input_grad[3], False],
                    )  # fmt: skip
                    grad_from_s = grad_from_s.to(ctx.y_dtype)
                    if grad_gather_weight is not None:
                        grad_gather_weight = grad_gather_weight.to(gather_weight.dtype)
                else:
                    with torch.enable_grad():
                        y_leaf = y.detach().requires_grad_()
                        (grad_from_s,) = torch.autograd.grad(first(y_leaf, None), y_leaf, grad_s)
        del y
        total = grad_from_s
        if grad_out is not None:
            # The excite's share grad_out * gate, folded into the same pass.
            total = excite.multiply(grad_out) if total is None else excite.multiply_add(total, grad_out)
        if grad_y is not None:
            total = grad_y if total is None else total + grad_y
        if total is None:
            return (None,) * 11
        total = total.expand_as(z).contiguous(memory_format=_memory_format(z))
        grad_z, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            total, z, weight, running_mean, running_var, mean if ctx.training else None,
            invstd if ctx.training else None, ctx.training, ctx.eps, list(ctx.needs_input_grad[:3]),
        )  # fmt: skip
        return grad_z, grad_weight, grad_bias, grad_gather_weight, None, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class ExciteMultiply(torch.autograd.Function):
    """``y * nearest_resize(gate)``, keeping the small gate and ``z`` (from which ``y`` is rebuilt).

    Its backward leaves ``grad_out * gate`` to :class:`BatchNormGather` (through the cache),
    which adds it to the gather's share in one pass.
    """

    @staticmethod
    def forward(
        ctx,
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
        return GateBroadcast(gate, y, y.dtype).multiply(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gate, z, scale, shift = ctx.saved_tensors
        excite = GateBroadcast(gate, z, ctx.y_dtype)
        grad_gate = None
        if ctx.needs_input_grad[1]:
            y = _recompute(z, scale, shift, ctx.y_dtype)
            grad_gate = excite.gate_grad(grad_out, y)
            if ctx.share_y:
                ctx.cache.y = y
            del y
        if not ctx.needs_input_grad[0]:
            return None, grad_gate, None, None, None, None, None
        ctx.cache.grad_out, ctx.cache.excite = grad_out, excite
        return None, grad_gate, None, None, None, None, None


# Global average gather (GE-θ− global, SE): everything the unit needs from the full-size map
# is a per-(sample, channel) sum, so BN(z) is never written out. Forward: BN statistics, the
# per-(n, c) mean of z (mean(BN(z)) = scale * mean(z) + shift) and one pass for
# ``out = z * (scale * gate) + shift * gate``. Backward: two per-(n, c) reductions of
# grad_out and grad_out * z, then one pass for grad_z (the BN backward in closed form).


def _two_pass_stats(z: torch.Tensor) -> bool:
    """Whether :func:`batch_stats` computes the statistics itself (NCHW on the CPU)."""
    return _cpu_kernels(z) and z.is_contiguous()


def batch_stats(
    z: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    accumulate: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-channel batch mean and biased variance of ``z``, updating the running averages as
    ``nn.BatchNorm2d`` does, and the per-(sample, channel) mean ``(N, C)`` when it comes for free.

    For an NCHW map on the CPU, ``torch.batch_norm_update_stats`` runs at a fraction of memory
    speed (about 8x slower than a mean over H, W); there two passes are about 2x faster: the
    per-(sample, channel) means (which the global gather needs anyway), then the squared
    deviations from the channel mean in cache-sized chunks (the stable two-pass variance).
    """
    if not _two_pass_stats(z):
        mean, var = torch.batch_norm_update_stats(z, running_mean, running_var, momentum)
        return mean, var, None
    n, c, h, w = z.shape
    sample_mean = z.mean((2, 3), dtype=accumulate)
    mean = sample_mean.mean(0)
    centred = mean.view(1, c, 1, 1)
    squares = torch.zeros(c, dtype=accumulate, device=z.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, c * h * w))
    for i in range(0, n, step):
        squares += (z[i : i + step] - centred).square_().sum((0, 2, 3), dtype=accumulate)
    count = n * h * w
    if running_mean is not None and running_var is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((squares / max(count - 1, 1)).to(running_var.dtype), alpha=momentum)
    return mean, squares / count, sample_mean


@dataclass
class MeanCache:
    """What :class:`ExciteAffine`'s backward hands to :class:`BatchNormMean`'s backward."""

    grad_out: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    grad_sum: torch.Tensor | None = None  # sum over H, W of grad_out, (N, C, 1, 1)
    grad_dot: torch.Tensor | None = None  # sum over H, W of grad_out * z, (N, C, 1, 1)


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, -1, 1, 1)


class BatchNormMean(torch.autograd.Function):
    """BN statistics of ``z`` and the global gather ``s = sum_hw(K * BN(z))``; an empty tensor
    stands in for ``BN(z)``.

    ``K`` is a global depthwise kernel ``(C, 1, H, W)`` (GE-θ), or ``None`` for the mean
    (``K = 1/HW``: GE-θ−, SE). ``sum_hw(K * BN(z)) = scale * sum_hw(K * z) + shift * sum_hw(K)``.
    """

    @staticmethod
    def forward(
        ctx,
        z: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        kernel: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        accumulate: torch.dtype,
        cache: MeanCache,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sample_mean = None
        if training:
            mean, var, sample_mean = batch_stats(z, running_mean, running_var, momentum, accumulate)
        else:
            mean, var = running_mean, running_var
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        shift = bias - mean * scale
        n, c = z.shape[:2]
        acc = torch.promote_types(accumulate, scale.dtype)
        if kernel is None:
            if sample_mean is None:
                sample_mean = z.mean((2, 3), dtype=accumulate)
            z_dot = sample_mean.view(n, c, 1, 1).to(acc)
            kernel_sum = torch.ones_like(shift, dtype=acc)
        else:
            z_dot = map_dot(z, kernel[:, 0], acc).view(n, c, 1, 1)
            kernel_sum = kernel.sum((1, 2, 3), dtype=acc)
        s = torch.addcmul(_per_channel(shift * kernel_sum), z_dot, _per_channel(scale)).to(z.dtype)
        ctx.training, ctx.accumulate, ctx.cache = training, accumulate, cache
        ctx.save_for_backward(z, kernel, mean, invstd, scale, shift, z_dot, kernel_sum)
        ctx.mark_non_differentiable(scale, shift)
        ctx.set_materialize_grads(False)
        return z.new_empty(0), s, scale, shift

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_link, grad_s, _grad_scale, _grad_shift):
        z, kernel, mean, invstd, scale, shift, z_dot, kernel_sum = ctx.saved_tensors
        cache: MeanCache = ctx.cache
        grad_out, gate, grad_sum, grad_dot = cache.grad_out, cache.gate, cache.grad_sum, cache.grad_dot
        cache.grad_out = cache.gate = cache.grad_sum = cache.grad_dot = None
        n, c, h, w = z.shape
        hw, count = h * w, n * h * w
        acc = z_dot.dtype
        zeros = z.new_zeros((n, c, 1, 1), dtype=acc)
        # grad of BN(z) = gate * grad_out + ds * K: the excite's share and the gather's.
        ds = zeros if grad_s is None else grad_s.to(acc)
        g = zeros if gate is None else gate.to(acc)
        grad_sum = zeros if grad_sum is None else grad_sum
        grad_dot = zeros if grad_dot is None else grad_dot
        m = _per_channel(mean).to(acc)
        k_sum = _per_channel(kernel_sum)
        sum_dy = (g * grad_sum + ds * k_sum).sum(0, keepdim=True)
        sum_dy_centered = (g * (grad_dot - m * grad_sum) + ds * (z_dot - m * k_sum)).sum(0, keepdim=True)
        a = _per_channel(scale).to(acc)
        # With the mean (K = 1/HW) the gather's share is constant over H x W.
        spread = ds / hw if kernel is None else zeros
        if ctx.training:
            coef_z = -a * invstd.to(acc).square().view(1, -1, 1, 1) * sum_dy_centered / count
            const = a * (spread - sum_dy / count) - coef_z * m
        else:
            coef_z, const = None, a * spread
        grad_z = None
        if ctx.needs_input_grad[0]:
            if grad_out is not None:
                grad_z = torch.addcmul(const, grad_out, a * g)
                if coef_z is not None:
                    grad_z.addcmul_(z, coef_z)
            else:
                grad_z = const.expand(z.shape) if coef_z is None else torch.addcmul(const, z, coef_z)
            if kernel is not None:
                # The kernel in the map's layout: broadcasting an NCHW kernel into a channels-last
                # gradient reads it with a stride of H*W, about 3x slower than this copy plus the pass.
                kernel_map = torch.empty_like(z[0], dtype=acc).copy_(kernel[:, 0]).unsqueeze(0)
                grad_z = grad_z + kernel_map * (a * ds) if grad_z.shape != z.shape else (
                    grad_z.addcmul_(kernel_map, a * ds)
                )  # fmt: skip
            grad_z = grad_z.to(z.dtype)
        grad_kernel = None
        if kernel is not None and ctx.needs_input_grad[3]:
            # sum_n ds * BN(z) = scale * sum_n ds * z + shift * sum_n ds
            dz_sum = map_weighted_sum(ds.view(n, c), z, acc)
            grad_kernel = dz_sum * scale.to(acc).view(c, 1, 1) + (shift.to(acc) * ds.view(n, c).sum(0)).view(c, 1, 1)
            grad_kernel = grad_kernel.unsqueeze(1).to(kernel.dtype)
        grad_weight = (sum_dy_centered * _per_channel(invstd)).view(c).to(scale.dtype)
        grad_bias = sum_dy.view(c).to(scale.dtype)
        return grad_z, grad_weight, grad_bias, grad_kernel, None, None, None, None, None, None, None


class ExciteAffine(torch.autograd.Function):
    """``BN(z) * gate`` for a per-(n, c) gate, as one pass ``z * (scale * gate) + shift * gate``."""

    @staticmethod
    def forward(
        ctx, link: torch.Tensor, gate: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
        cache: MeanCache,
    ) -> torch.Tensor:  # fmt: skip
        ctx.cache = cache
        ctx.save_for_backward(gate, z, scale, shift)
        return torch.addcmul(_per_channel(shift) * gate, z, _per_channel(scale) * gate).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gate, z, scale, shift = ctx.saved_tensors
        acc = torch.promote_types(gate.dtype, scale.dtype)
        grad_sum = grad_out.sum((2, 3), keepdim=True, dtype=acc)
        grad_dot = map_dot(grad_out, z, acc).view(grad_sum.shape)
        # sum_hw(grad_out * BN(z)) = scale * sum_hw(grad_out * z) + shift * sum_hw(grad_out)
        grad_gate = torch.addcmul(_per_channel(shift) * grad_sum, grad_dot, _per_channel(scale)).to(gate.dtype)
        if ctx.needs_input_grad[0]:
            ctx.cache.grad_out, ctx.cache.gate = grad_out, gate
            ctx.cache.grad_sum, ctx.cache.grad_dot = grad_sum, grad_dot
        return None, grad_gate if ctx.needs_input_grad[1] else None, None, None, None, None
