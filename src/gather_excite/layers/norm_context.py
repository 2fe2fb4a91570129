"""A residual branch's last norm layer followed by its context module, as one step.

Every residual unit ends its branch with ``context(norm(z))``; it builds a :class:`NormContext`
for that pair and calls it, so that how the pair is computed is decided here and nowhere else
(the way timm's ``BatchNormAct2d`` stands for norm + activation).

With autograd recording, an affine ``nn.BatchNorm2d`` followed by a :class:`GatherExcite` or
:class:`SqueezeExcite` (through their ``gather_split`` and ``gate_from``) takes the memory-lean
path of :mod:`._lean`: it keeps the BatchNorm's input ``z`` (which the BatchNorm keeps anyway)
instead of also keeping its full-size output, and gives the plain composition's results,
gradients and running statistics. :func:`lean_applies` says, in one place, when it steps aside.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad

from ._lean import lean_norm_context
from ._validate import check_input
from .gather_excite import GatherExcite, SqueezeExcite

__all__ = ["NormContext", "lean_applies", "lean_enabled", "set_lean"]

_ENABLED = True


def set_lean(enabled: bool) -> None:
    """Allow (default) or forbid the memory-lean path everywhere, e.g. to benchmark the plain one.

    A :class:`NormContext` built while it is forbidden stays plain; one built while it is allowed
    takes the lean path only while it is allowed.
    """
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} ({enabled!r})")
    _ENABLED = enabled


def lean_enabled() -> bool:
    """Whether the memory-lean path is allowed (see :func:`set_lean`)."""
    return _ENABLED


def _hooked(module: nn.Module) -> bool:
    # PyTorch has no public query for a module's hooks; these are the dictionaries that
    # nn.Module.__call__ itself reads to decide whether to run any.
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _tracked(tensors: list[torch.Tensor]) -> bool:
    """Whether any tensor carries a forward-mode tangent or is wrapped by a functorch transform."""
    return any(forward_ad.unpack_dual(t).tangent is not None or torch.func.debug_unwrap(t) is not t for t in tensors)


def lean_applies(norm: nn.Module, context: nn.Module, x: torch.Tensor) -> bool:
    """Whether the lean path computes ``context(norm(x))`` here with nothing able to tell the difference.

    The plain composition runs instead for: a norm layer other than an affine ``nn.BatchNorm2d``
    (``SyncBatchNorm``, ``FrozenBatchNorm2d``) or a context module other than :class:`GatherExcite`
    and :class:`SqueezeExcite` (whose ``gather_split``/``gate_from`` the lean path uses); no autograd
    recording, or nothing that requires a gradient; an empty batch or a non-floating map (the plain
    modules raise their own errors), or one value per channel in
    training (``nn.BatchNorm2d`` raises its own error); forward-mode AD and functorch transforms
    (the lean autograd functions have no jvp or vmap rule); ``torch.compile``/``torch.export``
    tracing (the compiler recomputes ``BN(z)`` by itself), TorchScript and ``torch.jit.trace``;
    and hooks on the norm layer or inside the context module, other than on the gate probe (they
    must see the plain calls; the gate probe is called as a module on either path).
    """
    # Exact types: a subclass may compute something else than the API describes.
    if type(norm) is not nn.BatchNorm2d or not norm.affine or type(context) not in (GatherExcite, SqueezeExcite):
        return False
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.numel() == 0 or not x.is_floating_point():
        return False
    if not torch.is_grad_enabled():
        return False
    if norm.training and x.numel() // x.shape[1] <= 1:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    params = [norm.weight, norm.bias, *context.parameters()]
    if not (x.requires_grad or any(p.requires_grad for p in params)) or _tracked([x, *params]):
        return False
    return not (_hooked(norm) or any(_hooked(m) for m in context.modules() if m is not context.gate))


class NormContext(nn.Module):
    """``context(norm(x))``: a residual branch's last norm layer, then its context module.

    The unit that builds it keeps owning ``norm`` and ``context`` (their parameters, state-dict
    keys and hooks stay the unit's, and a converted norm layer, e.g. ``SyncBatchNorm``, is seen)
    and passes them on each call; this module holds how the pair is computed.

    Args:
        lean: take the memory-lean path where :func:`lean_applies`; chosen when the module is
            built, from :func:`lean_enabled` by default.
    """

    def __init__(self, *, lean: bool | None = None, device: torch.device | None = None, dtype=None) -> None:
        super().__init__()  # device and dtype: PyTorch's module convention; this module holds no tensors
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
