"""BatchNorm followed by a context module, as every residual unit applies it.

Every backbone calls :func:`bn_context` at the end of its residual branch, so that a
memory-lean implementation can replace the plain composition in one place.

With autograd recording, a Gather-Excite or SE unit after a plain ``nn.BatchNorm2d`` runs
through :mod:`._fused_autograd`: autograd then keeps the BatchNorm's input ``z`` (which the
plain BatchNorm keeps too) instead of also keeping its full-size output, and rebuilds that
output from ``z`` in the backward pass. The results, the gradients and the BatchNorm's
running statistics equal the plain composition's. Anything unusual (hooks on the modules
other than the gate probe, other norm layers, no grad, ``torch.compile`` tracing) takes the
plain composition.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules import module as module_globals

from ._fused_autograd import (
    BatchNormGather,
    BatchNormMean,
    ExciteAffine,
    ExciteMultiply,
    FirstGather,
    MeanCache,
    RecomputeCache,
)
from ._validate import accumulate_dtype, check_input
from .gather import ConvGather, GlobalConvGather, PoolGather
from .gather_excite import GatherExcite, SqueezeExcite

__all__ = ["bn_context", "fused_enabled", "set_fused"]

_ENABLED = True


def set_fused(enabled: bool) -> None:
    """Turn the memory-lean path of :func:`bn_context` on or off (for benchmarks and tests)."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} ({enabled!r})")
    _ENABLED = enabled


def fused_enabled() -> bool:
    """Whether :func:`bn_context` may take the memory-lean path."""
    return _ENABLED


def bn_context(bn: nn.Module, context: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``context(bn(x))``: the residual branch's last BatchNorm, then its context module."""
    if _can_fuse(bn, context, x):
        return _fused(bn, context, x)
    return context(bn(x))


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _can_fuse(bn: nn.Module, context: nn.Module, x: torch.Tensor) -> bool:
    if not (_ENABLED and torch.is_grad_enabled()) or type(context) not in (GatherExcite, SqueezeExcite):
        return False
    if type(bn) is not nn.BatchNorm2d or not bn.affine or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    if x.numel() == 0 or forward_ad.unpack_dual(x).tangent is not None:
        return False  # an empty batch, or forward-mode AD (the autograd functions have no jvp)
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    # Forward/backward hooks on the BN or inside the context module (FLOP counters, feature
    # extractors) must see the plain calls; the gate probe is called as a module either way.
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    if module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks:
        return False
    if _has_hooks(bn) or any(_has_hooks(m) for m in context.modules() if m is not context.gate):
        return False
    return (
        x.requires_grad
        or any(p.requires_grad for p in bn.parameters())
        or any(p.requires_grad for p in context.parameters())
    )


def _bn_arguments(bn: nn.BatchNorm2d) -> tuple[torch.Tensor | None, torch.Tensor | None, bool, float]:
    """Running stats, mode and averaging factor exactly as ``nn.BatchNorm2d.forward`` picks them."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if keep_running else None
    running_var = bn.running_var if keep_running else None
    return running_mean, running_var, use_batch_stats, factor


def _first_gather(context: nn.Module, size: tuple[int, int], dtype: torch.dtype):
    """The full-size first op, its weight, and the rest of the gate's path as a callable."""
    if type(context) is SqueezeExcite:
        return FirstGather("mean", accumulate=accumulate_dtype(dtype)), None, context.mlp
    gather = context.gather
    if type(gather) is ConvGather:
        conv = gather.layers[0]
        first = FirstGather("conv", stride=conv.stride[0], padding=conv.padding[0], groups=conv.groups)
        return first, conv.weight, _Chain(list(gather.layers)[1:], context)
    if type(gather) is GlobalConvGather:
        first = FirstGather("global_conv", accumulate=accumulate_dtype(dtype))
        return first, gather.kernel_for(size), _Chain([gather.bn], context)
    if type(gather) is not PoolGather:
        return None
    # An extent at least as large as the map pools each channel into one cell over the whole map
    # (padding excluded from the mean): the global mean.
    if gather.mode == "avg" and (gather.extent is None or gather.extent >= max(size)):
        first = FirstGather("mean", accumulate=accumulate_dtype(dtype))
    elif gather.mode == "avg":
        e = gather.extent
        first = FirstGather("avg_pool", kernel_size=2 * e - 1, stride=e, padding=e - 1)
    else:
        first = FirstGather("module", module=gather)
    return first, None, _Chain([], context)


class _Chain:
    """The gather's remaining layers on the reduced map, then the excite MLP (if any)."""

    def __init__(self, layers: list[nn.Module], context: GatherExcite) -> None:
        self.layers = layers
        self.context = context

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            s = layer(s)
        if self.context.mlp is not None:
            s = self.context.mlp(self.context.pre_mlp(s))
        return s


def _fused(bn: nn.BatchNorm2d, context: nn.Module, z: torch.Tensor) -> torch.Tensor:
    found = _first_gather(context, (z.shape[-2], z.shape[-1]), z.dtype)
    if found is None:
        return context(bn(z))
    first, gather_weight, rest = found
    # The context module validates the BN's output; the BN keeps the shape, so check z.
    check_input(z, context.channels)
    if bn.training and z.numel() // z.shape[1] <= 1:
        return context(bn(z))  # nn.BatchNorm2d raises its own error for one value per channel
    running_mean, running_var, use_batch_stats, factor = _bn_arguments(bn)
    if first.kind in ("mean", "global_conv"):
        mean_cache = MeanCache()
        link, s, scale, shift = BatchNormMean.apply(
            z, bn.weight, bn.bias, gather_weight, running_mean, running_var, use_batch_stats, factor, bn.eps,
            first.accumulate, mean_cache,
        )  # fmt: skip
        logits = rest(s)
        gate = context.gate(torch.sigmoid(logits.to(accumulate_dtype(logits.dtype))))
        return ExciteAffine.apply(link, gate, z, scale, shift, mean_cache)
    cache = RecomputeCache()
    y, s, scale, shift = BatchNormGather.apply(
        z, bn.weight, bn.bias, gather_weight, running_mean, running_var, use_batch_stats, factor, bn.eps, first, cache
    )
    logits = rest(s)
    gate = context.gate(torch.sigmoid(logits.to(accumulate_dtype(logits.dtype))))
    return ExciteMultiply.apply(y, gate, z, scale, shift, cache, first.kind in ("conv", "module"))
