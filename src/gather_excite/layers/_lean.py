"""The memory-lean ``context(batch_norm(z))`` of :class:`~gather_excite.layers.NormContext`: where autograd
would keep ``y = BN(z)`` besides ``z``, one autograd function per unit keeps ``z`` and per-channel statistics,
using the context's API (``gather_split``, ``gather``, ``gate_from``). A global weighted sum never writes ``y``
(``sum_hw(K * BN(z)) = scale * sum_hw(K * z) + shift * sum_hw(K)``); a windowed gather is recorded again in backward."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._broadcast import GateBroadcast
from ._reduce import as_channel, batch_stats, map_dot, map_weighted_sum
from ._validate import accumulate_dtype


class _Unit:
    """What one call's forward hands its backward besides the saved tensors."""

    def __init__(self, norm: nn.BatchNorm2d, context: nn.Module, z: torch.Tensor) -> None:
        self.split = context.gather_split((z.shape[-2], z.shape[-1]))
        self.gate_from, self.eps, self.buffers, self.kept = context.gate_from, norm.eps, [], []
        self.params = [p for p in context.parameters() if p.requires_grad]
        if self.split is None:  # a windowed gather, run whole and replayed in backward (see replay)
            self.gather, self.buffers, kind = context.gather, list(context.buffers()), z.device.type
            self.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        # Running stats, mode and averaging factor exactly as nn.BatchNorm2d.forward picks them.
        self.factor = 0.0 if norm.momentum is None else norm.momentum
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            self.factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        self.batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
        tracked = not (norm.training and not norm.track_running_stats)
        self.running_mean, self.running_var = (norm.running_mean, norm.running_var) if tracked else (None, None)

    def statistics(self, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        """BN's per-channel ``mean``, ``invstd``, ``y = z * scale + shift`` and (maybe) sample means."""
        sample_mean, mean, var = None, self.running_mean, self.running_var
        if self.batch_stats:
            mean, var, sample_mean = batch_stats(z, mean, var, self.factor, accumulate_dtype(z.dtype))
        invstd = torch.rsqrt(var + self.eps)
        return mean, invstd, (scale := weight * invstd), bias - mean * scale, sample_mean

    def record(self, entry: torch.Tensor, gather) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, recorded)``: ``gate_from(gather(entry))``, recorded from a detached ``entry``."""
        with torch.enable_grad():
            self.entry = entry.detach().requires_grad_()
            recorded = self.gate_from(gather(self.entry))
        return recorded.detach(), recorded

    def replay(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`record` of the windowed gather in backward under the forward's autocast; the running
        statistics its norms update are put back by :meth:`gate_backward`, once the recording is used."""
        self.kept = [b.clone() for b in self.buffers]
        kind, dtype, enabled = self.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            return self.record(y, self.gather)

    def gate_backward(self, recorded: torch.Tensor, grad_gate: torch.Tensor):
        """Gradient of the recording's entry, and of the context's parameters on the gate's path."""
        try:
            if recorded.grad_fn is None:  # a hook on the probe replaced the gate by a constant
                return None, {}
            _check_gate_inputs(recorded, {id(self.entry), *map(id, self.params)})
            entry, *grads = torch.autograd.grad(recorded, [self.entry, *self.params], grad_gate.to(recorded.dtype),
                                                retain_graph=True, allow_unused=True)  # fmt: skip
            return entry, dict(zip(self.params, grads, strict=True))
        finally:
            for buffer, value in zip(self.buffers, self.kept, strict=True):
                buffer.copy_(value)


def _check_gate_inputs(recorded: torch.Tensor, own: set[int]) -> None:
    """Refuse a gate that a hook on the probe made depend on a tensor the lean function does not take
    (a parameter outside the context module): its gradient would be lost. Walks the recording back to
    the sigmoid that every gate ends with, so without hooks this looks at one node."""
    stack, seen = [recorded.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() == "SigmoidBackward0":  # the context's own gate: its inputs are the recording's
            continue
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf tensor
        if variable is not None and id(variable) not in own:
            raise RuntimeError(
                "a hook on the context's gate (module.gate) returns a gate that depends on a tensor outside the "
                f"context module (shape {tuple(variable.shape)}); the memory-lean path cannot pass its gradient: "
                "build the model after gather_excite.layers.set_lean(False), or with NormContext(lean=False)"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)


def _rebuild(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(as_channel(shift), z, as_channel(scale)).to(z.dtype)


class LeanGlobal(torch.autograd.Function):
    """``BN(z) * gate(sum_hw(K * BN(z)))`` for a global weighted sum; keeps ``z`` and per-(n, c) sums."""

    @staticmethod
    def forward(ctx, unit: _Unit, z, weight, bias, kernel, *params):
        n, c, h, w = z.shape
        mean, invstd, scale, shift, sample_mean = unit.statistics(z, weight, bias)
        acc = torch.promote_types(accumulate_dtype(z.dtype), scale.dtype)
        if kernel is None:  # the same K at every position: sum_hw(K * z) = K * H * W * mean_hw(z)
            sample_mean = z.mean((2, 3), dtype=acc) if sample_mean is None else sample_mean
            z_dot = sample_mean.to(acc) * (unit.split.weights * h * w)
            kernel_sum = torch.full_like(scale, unit.split.weights * h * w, dtype=acc)
        else:
            z_dot, kernel_sum = map_dot(z, kernel, acc), kernel.sum((1, 2), dtype=acc)
        gate, recorded = unit.record((scale * z_dot + shift * kernel_sum).view(n, c, 1, 1).to(z.dtype), unit.split.rest)
        ctx.unit = unit
        ctx.save_for_backward(z, kernel, mean, invstd, scale, shift, z_dot, kernel_sum, gate, recorded)
        return torch.addcmul(as_channel(shift) * gate, z, as_channel(scale) * gate).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, kernel, mean, invstd, scale, shift, z_dot, kernel_sum, gate, recorded = ctx.saved_tensors
        unit, (n, c, h, w), acc = ctx.unit, z.shape, z_dot.dtype
        mean, a, g = mean.to(acc), scale.to(acc), gate.view(n, c).to(acc)
        grad_sum, grad_dot = grad_out.sum((2, 3), dtype=acc), map_dot(grad_out, z, acc)  # (N, C) each
        # sum_hw(grad_out * BN(z)) = scale * sum_hw(grad_out * z) + shift * sum_hw(grad_out)
        ds, grads = unit.gate_backward(recorded, (scale * grad_dot + shift * grad_sum).view(n, c, 1, 1))
        kernel_used = ds is not None  # None: a hook replaced the gate by a constant; K then gets no gradient
        ds = torch.zeros_like(z_dot) if ds is None else ds.view(n, c).to(acc)
        # The gradient of BN(z) is g * grad_out + ds * K: its per-channel sum and its sum against z - mean.
        sum_dy = (g * grad_sum + ds * kernel_sum).sum(0)
        sum_dy_centred = (g * (grad_dot - mean * grad_sum) + ds * (z_dot - mean * kernel_sum)).sum(0)
        grad_z = grad_kernel = None
        if ctx.needs_input_grad[1]:
            # A constant K adds the same a * ds * K at every position; a K map is added below.
            const = a * ds * (kernel_sum / (h * w)) if kernel is None else torch.zeros_like(ds)
            coef_z = -a * invstd.to(acc).square() * sum_dy_centred / (n * h * w) if unit.batch_stats else None
            if coef_z is not None:
                const = const - a * sum_dy / (n * h * w) - coef_z * mean
            grad_z = torch.addcmul(const.view(n, c, 1, 1), grad_out, (a * g).view(n, c, 1, 1))
            if coef_z is not None:
                grad_z.addcmul_(z, as_channel(coef_z))
            if kernel is not None:  # in the map's layout: an NCHW kernel in a channels-last sum is a strided read
                grad_z.addcmul_(torch.empty_like(z[0], dtype=acc).copy_(kernel).unsqueeze(0), (a * ds).view(n, c, 1, 1))
            grad_z = grad_z.to(z.dtype)
        # sum_n ds * BN(z) = scale * sum_n ds * z + shift * sum_n ds
        if kernel is not None and ctx.needs_input_grad[4] and kernel_used:
            grad_kernel = map_weighted_sum(ds, z, acc) * a.view(c, 1, 1) + (shift.to(acc) * ds.sum(0)).view(c, 1, 1)
            grad_kernel = grad_kernel.to(kernel.dtype)
        grad_weight, grad_bias = (sum_dy_centred * invstd).to(scale.dtype), sum_dy.to(scale.dtype)
        return None, grad_z, grad_weight, grad_bias, grad_kernel, *(grads.get(p) for p in unit.params)


class LeanWindowed(torch.autograd.Function):
    """``y * resize(gate(gather(y)))``, ``y = BN(z)``; keeps ``z`` and per-channel statistics. Backward
    rebuilds ``y`` and records the gather and gate again; their hooks fire again, as under checkpointing."""

    @staticmethod
    def forward(ctx, unit: _Unit, z, weight, bias, *params):
        mean, invstd, scale, shift, _ = unit.statistics(z, weight, bias)
        y = _rebuild(z, scale, shift)
        gate = unit.gate_from(unit.gather(y))
        ctx.unit = unit
        running = (None, None) if unit.batch_stats else (unit.running_mean, unit.running_var)
        ctx.save_for_backward(z, weight, *running, mean, invstd, scale, shift)
        GateBroadcast(gate, y).multiply(y, out=y)  # y is not kept: its buffer becomes the output
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, weight, running_mean, running_var, mean, invstd, scale, shift = ctx.saved_tensors
        unit, y = ctx.unit, _rebuild(z, scale, shift)
        gate, recorded = unit.replay(y)
        excite = GateBroadcast(gate, y)
        grad_y, grads = unit.gate_backward(recorded, excite.gate_grad(grad_out, y))
        # The gather's share of y's gradient plus the excite's, in one pass.
        total = excite.multiply(grad_out) if grad_y is None else excite.multiply_add(grad_y.to(z.dtype), grad_out)
        del y
        layout = torch.channels_last if not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format  # fmt: skip
        stats = (mean, invstd) if unit.batch_stats else (None, None)
        grad_z, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            total.contiguous(memory_format=layout), z, weight, running_mean, running_var, *stats, unit.batch_stats,
            unit.eps, list(ctx.needs_input_grad[1:4]),
        )  # fmt: skip
        return None, grad_z, grad_weight, grad_bias, *(grads.get(p) for p in unit.params)


def lean_norm_context(norm: nn.BatchNorm2d, context: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``context(norm(z))`` keeping only ``z`` at full size for backward (see the module's docstring)."""
    unit = _Unit(norm, context, z)
    if unit.split is None:
        return LeanWindowed.apply(unit, z, norm.weight, norm.bias, *unit.params)
    kernel = unit.split.weights if isinstance(unit.split.weights, torch.Tensor) else None
    return LeanGlobal.apply(unit, z, norm.weight, norm.bias, kernel, *unit.params)
