"""``context(norm(z))`` of a residual branch as one step (as timm's ``BatchNormAct2d`` stands for
norm + activation); :func:`lean_applies` is the one rule for when the lean path of :mod:`._lean` steps aside;
:class:`BatchNorm2d` is the norm it takes."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad

from ._hooks import HookRecord, has_hooks
from ._lean import lean_norm_context
from ._validate import check_input
from .gather_excite import GatherExcite, SqueezeExcite

__all__ = ["BatchNorm2d", "NormContext", "lean_applies", "lean_enabled", "set_lean"]

_ENABLED = True


def set_lean(enabled: bool) -> None:
    """Allow (default) or forbid the memory-lean path everywhere, also in models built before."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} ({enabled!r})")
    _ENABLED = enabled


def lean_enabled() -> bool:
    """Whether the memory-lean path is allowed (see :func:`set_lean`)."""
    return _ENABLED


class BatchNorm2d(HookRecord, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that records the hooks registered on it (the same computation, parameters,
    buffers, state-dict keys and repr), so that :class:`NormContext` runs it as a module while it has
    any. The norm before a context module in this package's networks; a plain ``nn.BatchNorm2d`` there
    takes the plain path (its hooks cannot be known)."""


def lean_applies(norm: nn.Module, context: nn.Module, x: torch.Tensor) -> bool:
    """Whether the lean path computes ``context(norm(x))`` here as the plain composition would. Not for
    another norm or context (exact types: a subclass may compute otherwise), hooks registered on the
    norm or the context module (the lean path does not call them), nothing to differentiate, a map the
    plain modules reject with their own errors, forward-mode AD, functorch transforms, compiling,
    exporting, scripting or tracing (compilers recompute ``norm(x)`` by themselves)."""
    if type(norm) is not BatchNorm2d or not norm.affine or type(context) not in (GatherExcite, SqueezeExcite):
        return False
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.numel() and x.is_floating_point()):
        return False
    if not torch.is_grad_enabled() or (norm.training and x.numel() // x.shape[1] <= 1):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if has_hooks(norm) or has_hooks(context):
        return False
    tensors = [x, norm.weight, norm.bias, *context.parameters()]
    if not any(t.requires_grad for t in tensors):
        return False
    # Forward-mode tangents and functorch wrappers: the lean functions have no jvp or vmap rule.
    return all(forward_ad.unpack_dual(t).tangent is None and torch.func.debug_unwrap(t) is t for t in tensors)


class NormContext(nn.Module):
    """``context(norm(x))``; the unit owns ``norm`` and ``context`` (state-dict keys, a converted
    ``SyncBatchNorm``) and passes them on each call. ``lean`` (default :func:`lean_enabled`, chosen when
    the model is built, as timm's fused attention): take the lean path where :func:`lean_applies`. It
    calls the context's parts (a windowed gather, in forward and again in backward; a global gather's
    later steps; the MLP; the probe), whose hooks run, but not ``norm`` or the context as modules: while
    hooks are registered on either, the call is the plain composition. Global module hooks
    (``register_module_forward_hook``) cannot be known: they see this module's call."""

    def __init__(self, *, lean: bool | None = None, device: torch.device | None = None, dtype=None) -> None:
        super().__init__()  # device and dtype: PyTorch's module convention; there is nothing to place
        if lean is not None and not isinstance(lean, bool):
            raise TypeError(f"lean must be a bool or None, got {type(lean).__name__} ({lean!r})")
        self.lean = lean_enabled() if lean is None else lean

    def forward(self, x: torch.Tensor, norm: nn.Module, context: nn.Module) -> torch.Tensor:
        if self.lean and _ENABLED and lean_applies(norm, context, x):
            check_input(x, context.channels)  # the context module's own check (the norm keeps the shape)
            return lean_norm_context(norm, context, x)
        return context(norm(x))

    def extra_repr(self) -> str:
        return f"lean={self.lean}"
