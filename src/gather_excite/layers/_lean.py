"""The memory-lean ``context(batch_norm(z))`` behind :class:`~gather_excite.layers.NormContext`.

Autograd would keep ``y = BN(z)`` (full size, read by the gather and the multiply) besides ``z``,
which the BatchNorm keeps anyway. One autograd function per unit keeps ``z``, per-channel
statistics and the small gate, and rebuilds from ``z`` what its backward needs. The context
module enters through its own API only: ``gather_split(size)`` (which step reads the full-size
map) and ``gate_from(s)`` (reduced map to gate), recorded as ordinary autograd on a detached
copy of the reduced map. A global weighted sum never writes ``y``:
``sum_hw(K * BN(z)) = scale * sum_hw(K * z) + shift * sum_hw(K)``, and its backward is the
BatchNorm backward in closed form from two per-(sample, channel) sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._validate import accumulate_dtype

# Which kernels run: the CPU-tuned loops for CPU tensors, or the device-generic ops (einsum,
# multiply-and-sum, batch_norm_update_stats) that every other device takes. Tests set this to
# False to run the device-generic branches on the CPU.
CPU_KERNELS = True

# A global depthwise conv is a per-(sample, channel) dot product. CPU's depthwise convolution is
# slow at the map's size, and einsum's batched matmul copies a channels-last map to NCHW first;
# a loop over chunks of samples reads the map once, in its own layout, with a cache-sized temporary.
_CHUNK_ELEMENTS = 2**18


def _cpu_kernels(x: torch.Tensor) -> bool:
    return CPU_KERNELS and x.device.type == "cpu"


def _channel(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, -1, 1, 1)


def map_dot(x: torch.Tensor, other: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[n, c] = sum_hw x[n, c] * other[(n,) c]`` summed in ``dtype``, for one ``(C, H, W)``
    map shared by all samples or an ``(N, C, H, W)`` map of their own; ``(N, C)``."""
    n, c = x.shape[:2]
    shared = other.dim() == 3
    if not _cpu_kernels(x):
        if shared and x.is_contiguous():
            return torch.einsum("nchw,chw->nc", x, other.to(x.dtype)).to(dtype)
        return (x * other).sum((2, 3), dtype=dtype)
    if shared:  # the kernel in the samples' own layout: every product is one straight pass
        other = torch.empty_like(x[0]).copy_(other)
    out = torch.empty(n, c, dtype=dtype, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, x[0].numel()))
    for i in range(0, n, step):
        part = other if shared else other[i : i + step]
        torch.sum(x[i : i + step] * part, (2, 3), dtype=dtype, out=out[i : i + step])
    return out


def map_weighted_sum(weight: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[c, h, w] = sum_n weight[n, c] * x[n, c, h, w]``, summed in ``dtype``; ``(C, H, W)``."""
    if not _cpu_kernels(x) and x.is_contiguous():
        return torch.einsum("nc,nchw->chw", weight.to(x.dtype), x).to(dtype)
    weight = weight.to(dtype)[:, :, None, None]
    if not _cpu_kernels(x):
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
    ``nn.BatchNorm2d`` does, and the per-(sample, channel) mean ``(N, C)`` when it comes for free.

    ``torch.batch_norm_update_stats`` reads an NCHW map on the CPU at a fraction of memory speed;
    there two passes are about 2x faster: the per-(sample, channel) means (which a global gather
    needs anyway), then the squared deviations from the channel mean in cache-sized chunks (the
    stable two-pass variance).
    """
    if not (_cpu_kernels(z) and z.is_contiguous()):
        mean, var = torch.batch_norm_update_stats(z, running_mean, running_var, momentum)
        return mean, var, None
    n, c, h, w = z.shape
    sample_mean = z.mean((2, 3), dtype=accumulate)
    mean = sample_mean.mean(0)
    squares = torch.zeros(c, dtype=accumulate, device=z.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, c * h * w))
    for i in range(0, n, step):
        squares += (z[i : i + step] - _channel(mean)).square_().sum((0, 2, 3), dtype=accumulate)
    if running_mean is not None and running_var is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((squares / max(n * h * w - 1, 1)).to(running_var.dtype), alpha=momentum)
    return mean, squares / (n * h * w), sample_mean


def _runs(small: int, big: int, device: torch.device) -> torch.Tensor:
    """How many output rows nearest-resizing ``small`` rows to ``big`` gives each input row."""
    source = F.interpolate(torch.arange(small, dtype=torch.float32).view(1, 1, small, 1), size=(big, 1))
    return torch.bincount(source.view(big).long(), minlength=small).to(device)


class GateBroadcast:
    """``x * nearest_resize(gate)`` and its gate gradient, without a full-size copy of the gate
    where the map is a power-of-two multiple of it (a view broadcasts each cell over its block).

    Otherwise the gate is resized once: by run-length repeats for NCHW maps (CPU's nearest
    ``interpolate`` is slow for them), by ``F.interpolate`` in channels-last form otherwise.
    """

    def __init__(self, gate: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
        (h, w), (big_h, big_w) = gate.shape[-2:], x.shape[-2:]
        self.gate, self.size, self.block = gate, (big_h, big_w), None
        kh, kw = big_h // h, big_w // w
        # Power-of-two factors only: then interpolate's nearest source index floor(i * h / H) is i // kh.
        if (h, w) != (1, 1) and x.is_contiguous() and (kh * h, kw * w) == (big_h, big_w) and not (
            kh & (kh - 1) or kw & (kw - 1)
        ):  # fmt: skip
            self.block = kh
            self.factor = gate.to(dtype).repeat_interleave(kw, dim=-1).unsqueeze(3)  # W repeated; H a view
        elif (h, w) in ((1, 1), (big_h, big_w)):
            self.factor = gate.to(dtype)
        elif x.is_contiguous() and big_h >= h and big_w >= w:
            rows, cols = _runs(h, big_h, gate.device), _runs(w, big_w, gate.device)
            self.factor = gate.to(dtype).repeat_interleave(cols, dim=3, output_size=big_w).repeat_interleave(
                rows, dim=2, output_size=big_h
            )  # fmt: skip
        else:
            layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
            gate = gate.contiguous(memory_format=layout) if layout is not None else gate
            self.factor = F.interpolate(gate, size=self.size, mode="nearest").to(dtype)

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.gate.shape[-2], self.block)) if self.block is not None else x

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return (self._view(x) * self.factor).view(x.shape)

    def multiply_add(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + x * gate``; a fresh full-size ``base`` is updated in place."""
        if base.shape == x.shape and base.stride() == x.stride():
            self._view(base).addcmul_(self._view(x), self.factor)
            return base
        return base + self.multiply(x)

    def gate_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gradient of ``sum(grad_out * x * resize(gate))`` with respect to the small gate."""
        gate, product = self.gate, grad_out * x
        if gate.shape[-2:] == (1, 1):
            return product.sum((2, 3), keepdim=True, dtype=gate.dtype)
        if self.block is not None:
            rows = self._view(product).sum(3, dtype=gate.dtype)
            return rows.unflatten(3, (gate.shape[-1], -1)).sum(4)
        if gate.shape[-2:] == self.size:
            return product.to(gate.dtype)
        return torch.ops.aten.upsample_nearest2d_backward(
            product.to(gate.dtype), list(self.size), list(gate.shape), None, None
        )


def _bn_arguments(bn: nn.BatchNorm2d) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, float]:
    """Running stats, mode and averaging factor exactly as ``nn.BatchNorm2d.forward`` picks them."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if bn.training and not bn.track_running_stats:
        return None, None, use_batch_stats, factor
    return bn.running_mean, bn.running_var, use_batch_stats, factor


class _Unit:
    """What one call's forward hands its backward besides the saved tensors."""

    def __init__(self, norm: nn.BatchNorm2d, context: nn.Module, z: torch.Tensor) -> None:
        self.split = context.gather_split((z.shape[-2], z.shape[-1]))
        self.gate_from = context.gate_from
        self.params = [p for p in context.parameters() if p.requires_grad]
        first = self.split.first
        self.first_params = [] if first is None else [p for p in first.parameters() if p.requires_grad]
        self.running_mean, self.running_var, self.batch_stats, self.factor = _bn_arguments(norm)
        self.eps = norm.eps
        self.autocast = (z.device.type, torch.is_autocast_enabled(z.device.type),
                         torch.get_autocast_dtype(z.device.type))  # fmt: skip

    def statistics(self, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        """BN's per-channel ``mean``, ``invstd``, ``y = z * scale + shift`` and (maybe) sample means."""
        sample_mean = None
        if self.batch_stats:
            mean, var, sample_mean = batch_stats(
                z, self.running_mean, self.running_var, self.factor, accumulate_dtype(z.dtype)
            )
        else:
            mean, var = self.running_mean, self.running_var
        invstd = torch.rsqrt(var + self.eps)
        scale = weight * invstd
        return mean, invstd, scale, bias - mean * scale, sample_mean

    def gate(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, recorded)``: the gate of the reduced map ``s``, recorded from a detached copy.

        A zero scalar leaf added to the copy gives the recording an entry whose gradient backward
        reads without keeping ``s``. Saved with the unit's tensors, the recording lives as long as they do.
        """
        with torch.enable_grad():
            entry = s.detach() + s.new_zeros((), requires_grad=True)
            recorded = self.gate_from(self.split.rest(entry))
        self.entry = torch.autograd.graph.get_gradient_edge(entry)
        return recorded.detach(), recorded

    def gate_backward(
        self, recorded: torch.Tensor, grad_gate: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[torch.Tensor, torch.Tensor | None]]:
        """Gradient of the reduced map and of the context's parameters on the gate's path."""
        grads = torch.autograd.grad(
            recorded, [self.entry, *self.params], grad_gate.to(recorded.dtype), retain_graph=True, allow_unused=True
        )
        return grads[0], dict(zip(self.params, grads[1:], strict=True))


def _unhooked() -> torch.autograd.graph.saved_tensors_hooks:
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _recompute(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(_channel(shift), z, _channel(scale)).to(z.dtype)


class LeanGlobal(torch.autograd.Function):
    """``BN(z) * gate(sum_hw(K * BN(z)))`` for a global weighted sum; keeps ``z`` and per-(n, c) sums."""

    @staticmethod
    def forward(ctx, unit: _Unit, z, weight, bias, kernel, *params):
        n, c, h, w = z.shape
        mean, invstd, scale, shift, sample_mean = unit.statistics(z, weight, bias)
        acc = torch.promote_types(accumulate_dtype(z.dtype), scale.dtype)
        if kernel is None:  # the same number K at every position: sum_hw(K * z) = K * H * W * mean(z)
            if sample_mean is None:
                sample_mean = z.mean((2, 3), dtype=acc)
            z_dot = sample_mean.to(acc) * (unit.split.weights * h * w)
            kernel_sum = torch.full_like(scale, unit.split.weights * h * w, dtype=acc)
        else:
            z_dot = map_dot(z, kernel, acc)
            kernel_sum = kernel.sum((1, 2), dtype=acc)
        s = (scale * z_dot + shift * kernel_sum).view(n, c, 1, 1).to(z.dtype)
        gate, recorded = unit.gate(s)
        ctx.unit = unit
        ctx.save_for_backward(z, kernel, mean, invstd, scale, shift, z_dot, kernel_sum, gate, recorded)
        return torch.addcmul(_channel(shift) * gate, z, _channel(scale) * gate).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, kernel, mean, invstd, scale, shift, z_dot, kernel_sum, gate, recorded = ctx.saved_tensors
        unit: _Unit = ctx.unit
        n, c, h, w = z.shape
        acc = z_dot.dtype
        mean = mean.to(acc)
        grad_sum = grad_out.sum((2, 3), dtype=acc)  # (N, C)
        grad_dot = map_dot(grad_out, z, acc)  # (N, C)
        # sum_hw(grad_out * BN(z)) = scale * sum_hw(grad_out * z) + shift * sum_hw(grad_out)
        ds, grads = unit.gate_backward(recorded, (scale * grad_dot + shift * grad_sum).view(n, c, 1, 1))
        ds = torch.zeros_like(z_dot) if ds is None else ds.view(n, c).to(acc)
        g = gate.view(n, c).to(acc)
        # The gradient of BN(z) is g * grad_out + ds * K: its per-channel sum and its sum against z - mean.
        sum_dy = (g * grad_sum + ds * kernel_sum).sum(0)
        sum_dy_centred = (g * (grad_dot - mean * grad_sum) + ds * (z_dot - mean * kernel_sum)).sum(0)
        a = scale.to(acc)
        grad_z = None
        if ctx.needs_input_grad[1]:
            # With a constant K the gather's share is constant over H x W, a K map adds K * (a * ds).
            const = a * (ds * (kernel_sum / (h * w)) if kernel is None else torch.zeros_like(ds))
            coef_z = None
            if unit.batch_stats:
                coef_z = -a * invstd.to(acc).square() * sum_dy_centred / (n * h * w)
                const = const + a * (-sum_dy / (n * h * w)) - coef_z * mean
            grad_z = torch.addcmul(const.view(n, c, 1, 1), grad_out, (a * g).view(n, c, 1, 1))
            if coef_z is not None:
                grad_z.addcmul_(z, _channel(coef_z))
            if kernel is not None:
                # The kernel in the map's layout: broadcasting an NCHW kernel into a channels-last
                # gradient reads it with a stride of H*W, slower than this copy plus the pass.
                kernel_map = torch.empty_like(z[0], dtype=acc).copy_(kernel).unsqueeze(0)
                grad_z.addcmul_(kernel_map, (a * ds).view(n, c, 1, 1))
            grad_z = grad_z.to(z.dtype)
        grad_kernel = None
        if kernel is not None and ctx.needs_input_grad[4]:
            # sum_n ds * BN(z) = scale * sum_n ds * z + shift * sum_n ds
            grad_kernel = map_weighted_sum(ds, z, acc) * a.view(c, 1, 1) + (shift.to(acc) * ds.sum(0)).view(c, 1, 1)
            grad_kernel = grad_kernel.to(kernel.dtype)
        grad_weight = (sum_dy_centred * invstd).to(scale.dtype)
        grad_bias = sum_dy.to(scale.dtype)
        return None, grad_z, grad_weight, grad_bias, grad_kernel, *(grads.get(p) for p in unit.params)


class LeanWindowed(torch.autograd.Function):
    """``y * resize(gate(first(y)))`` with ``y = BN(z)``; keeps ``z``, per-channel statistics and the gate."""

    @staticmethod
    def forward(ctx, unit: _Unit, z, weight, bias, *params):
        mean, invstd, scale, shift, _ = unit.statistics(z, weight, bias)
        y = _recompute(z, scale, shift)
        gate, recorded = unit.gate(unit.split.first(y))
        ctx.unit = unit
        running = (unit.running_mean, unit.running_var) if not unit.batch_stats else (None, None)
        ctx.save_for_backward(z, weight, *running, mean, invstd, scale, shift, gate, recorded)
        return GateBroadcast(gate, y, y.dtype).multiply(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, weight, running_mean, running_var, mean, invstd, scale, shift, gate, recorded = ctx.saved_tensors
        unit: _Unit = ctx.unit
        y = _recompute(z, scale, shift)
        excite = GateBroadcast(gate, y, y.dtype)
        ds, grads = unit.gate_backward(recorded, excite.gate_grad(grad_out, y))
        total = None
        if ds is not None and unit.split.first_backward is not None:  # the gather's share, by its own backward
            total, *first_grads = unit.split.first_backward(y, ds)
            grads.update(zip(unit.split.first.parameters(), first_grads, strict=True))
        elif ds is not None:  # or from its first module run again on the rebuilt y
            device_type, enabled, dtype = unit.autocast
            # What this recomputation saves lives only within this backward: not saved activations.
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled), _unhooked():
                y_leaf = y.detach().requires_grad_()
                s = unit.split.first(y_leaf)
                total, *first_grads = torch.autograd.grad(s, [y_leaf, *unit.first_params], ds.to(s.dtype))
            grads.update(zip(unit.first_params, first_grads, strict=True))
        del y
        total = excite.multiply(grad_out) if total is None else excite.multiply_add(total.to(z.dtype), grad_out)
        channels_last = not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        grad_z, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            total.contiguous(memory_format=layout), z, weight, running_mean, running_var,
            mean if unit.batch_stats else None, invstd if unit.batch_stats else None, unit.batch_stats, unit.eps,
            list(ctx.needs_input_grad[1:4]),
        )  # fmt: skip
        return None, grad_z, grad_weight, grad_bias, *(grads.get(p) for p in unit.params)


def lean_norm_context(norm: nn.BatchNorm2d, context: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``context(norm(z))`` keeping only ``z`` at full size for backward (see the module's docstring)."""
    unit = _Unit(norm, context, z)
    if unit.split.first is None and isinstance(unit.split.weights, torch.Tensor):
        return LeanGlobal.apply(unit, z, norm.weight, norm.bias, unit.split.weights, *unit.params)
    if unit.split.first is None:
        return LeanGlobal.apply(unit, z, norm.weight, norm.bias, None, *unit.params)
    return LeanWindowed.apply(unit, z, norm.weight, norm.bias, *unit.params)
