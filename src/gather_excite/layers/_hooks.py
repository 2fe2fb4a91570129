"""Modules that know whether hooks are registered on them, so that :class:`~.NormContext` can step
aside for them. PyTorch keeps a module's hooks in private attributes and has no public query, so a
module with :class:`HookRecord` among its bases keeps the handle of every hook registered through its
own public ``register_*`` methods and asks the handle (``RemovableHandle.id``, ``.hooks_dict_ref``)
whether it is still registered: ``handle.remove()`` and ``with handle:`` are seen at once."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookRecord", "has_hooks"]

_HANDLES = "_gex_hook_handles"


def _recording(name: str) -> Callable[..., RemovableHandle]:
    register = getattr(nn.Module, name)

    @functools.wraps(register)
    def recording(self: nn.Module, *args, **kwargs) -> RemovableHandle:
        handle = getattr(super(HookRecord, self), name)(*args, **kwargs)
        self.__dict__.setdefault(_HANDLES, []).append(handle)
        return handle

    return recording


class HookRecord:
    """Mixin for an ``nn.Module`` (first among its bases): records the hooks registered on it through
    ``register_forward_pre_hook``, ``register_forward_hook`` and the backward ones (see :func:`has_hooks`)."""

    # The hooks that run inside ``module(...)``: a module the lean path does not call would skip them.
    register_forward_pre_hook = _recording("register_forward_pre_hook")
    register_forward_hook = _recording("register_forward_hook")
    register_full_backward_pre_hook = _recording("register_full_backward_pre_hook")
    register_full_backward_hook = _recording("register_full_backward_hook")
    register_backward_hook = _recording("register_backward_hook")


def has_hooks(module: nn.Module) -> bool | None:
    """Whether a hook registered through ``module``'s own methods is still registered; ``None`` when
    ``module`` does not record them (not a :class:`HookRecord`): no public API can tell then."""
    if not isinstance(module, HookRecord):
        return None
    handles = module.__dict__.get(_HANDLES)
    if not handles:
        return False
    live = [h for h in handles if (hooks := h.hooks_dict_ref()) is not None and h.id in hooks]
    module.__dict__[_HANDLES] = live
    return bool(live)
