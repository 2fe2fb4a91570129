"""``x * nearest_resize(gate)`` without a full-size copy of the gate where a view can broadcast it, and
the gate's gradient, for the windowed units of the memory-lean path (:mod:`._lean`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._reduce import map_dot, per_chunk


def _runs(small: int, big: int, device: torch.device) -> torch.Tensor:
    """How many output rows nearest-resizing ``small`` rows to ``big`` gives each input row."""
    source = F.interpolate(torch.arange(small, dtype=torch.float32).view(1, 1, small, 1), size=(big, 1))
    return torch.bincount(source.view(big).long(), minlength=small).to(device)


class GateBroadcast:
    """``x * nearest_resize(gate)`` and its gate gradient. A power-of-two multiple of the gate's size
    (interpolate's source index ``floor(i * h / H)`` is then ``i // k``) broadcasts a view over blocks:
    NCHW with W repeated (a short innermost run is slow), channels-last with C innermost. Else the gate
    is resized once, NCHW by run-length repeats (CPU's ``interpolate`` is slow there)."""

    def __init__(self, gate: torch.Tensor, x: torch.Tensor) -> None:
        (h, w), (big_h, big_w) = gate.shape[-2:], x.shape[-2:]
        self.gate, self.size, self.blocks, self.nhwc = gate, (big_h, big_w), None, False
        kh, kw = big_h // h, big_w // w
        gate = gate.to(x.dtype)
        blocks = (h, w) != (1, 1) and (kh * h, kw * w) == self.size and not (kh & kh - 1 or kw & kw - 1)
        if blocks and x.is_contiguous():  # H split into blocks by a view, W repeated in the factor
            self.blocks, self.factor = (kh, kw), gate.repeat_interleave(kw, dim=-1).unsqueeze(3)
        elif blocks and x.is_contiguous(memory_format=torch.channels_last):  # H and W split, C innermost
            self.blocks, self.nhwc = (kh, kw), True
            self.factor = gate.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)[:, :, None, :, None]
        elif (h, w) in ((1, 1), self.size):
            self.factor = gate
        elif x.is_contiguous() and big_h >= h and big_w >= w:
            rows, cols = _runs(h, big_h, gate.device), _runs(w, big_w, gate.device)
            gate = gate.repeat_interleave(cols, 3, output_size=big_w)
            self.factor = gate.repeat_interleave(rows, 2, output_size=big_h)
        else:
            channels_last = x.is_contiguous(memory_format=torch.channels_last)
            gate = gate.contiguous(memory_format=torch.channels_last) if channels_last else gate
            # CUDA's autocast runs interpolate in float32; a float32 factor would make the product float32.
            self.factor = F.interpolate(gate, size=self.size, mode="nearest").to(x.dtype)

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is None:
            return x
        (h, w), (kh, kw) = self.gate.shape[-2:], self.blocks
        return x.permute(0, 2, 3, 1).view(len(x), h, kh, w, kw, -1) if self.nhwc else x.unflatten(2, (h, kh))

    def multiply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x * gate``, into ``out`` (which may be ``x``) if given."""
        out = torch.empty_like(x) if out is None else out
        torch.mul(self._view(x), self.factor, out=self._view(out))
        return out

    def multiply_add(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + x * gate``, updating a fresh full-size ``base`` in place."""
        if base.shape != x.shape or base.stride() != x.stride():
            return base + self.multiply(x)
        self._view(base).addcmul_(self._view(x), self.factor)
        return base

    def gate_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gradient of ``sum(grad_out * x * resize(gate))`` for the gate, the products a few samples at a time."""
        gate = self.gate
        if gate.shape[-2:] == (1, 1):
            return map_dot(grad_out, x, gate.dtype).view(gate.shape)
        return per_chunk(lambda part, part_x: self._gate_grad(part * part_x, (len(part), *gate.shape[1:])), grad_out, x)

    def _gate_grad(self, product: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        product, (kh, kw) = product.to(self.gate.dtype), self.blocks or (0, 0)
        if self.nhwc:  # the mean of a power-of-two block, times its size: exact, and fast on channels-last
            return F.avg_pool2d(product, (kh, kw)) * (kh * kw)
        if kh > 2:  # long NCHW runs: summing a view beats the generic kernel
            return self._view(product).sum(3).unflatten(3, (shape[-1], kw)).sum(4)
        return torch.ops.aten.upsample_nearest2d_backward(product, self.size, shape, None, None)
