"""Context modules by name: the spec strings of :mod:`.context_spec`, mapped to their constructors.

``"se"``, ``"ge_theta_minus"``, ``"ge_theta"``, ``"ge_theta_plus"`` are the paper's global
variants; a suffix ``_e2`` / ``_e4`` / ``_e8`` picks the extent ratio, and
``"ge_theta_minus_max"`` swaps average for max pooling (the supplement's study).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from .context_spec import ContextSpec, context_specs

__all__ = ["CONTEXT_SPECS", "ContextArg", "create_context", "get_context", "list_context_specs"]

ContextArg = str | type[nn.Module] | Callable[..., nn.Module] | None

CONTEXT_SPECS: dict[str, Callable[..., nn.Module]] = {spec.name: spec.factory for spec in context_specs()}


def list_context_specs() -> list[str]:
    """All known spec strings, sorted."""
    return sorted(CONTEXT_SPECS)


def get_context(spec: str) -> Callable[..., nn.Module]:
    """The constructor (class or partial) that a spec string names."""
    if isinstance(spec, str) and spec in CONTEXT_SPECS:
        return CONTEXT_SPECS[spec]
    return ContextSpec.parse(spec).factory  # raises, naming the closest specs


def _accepts(fn: Callable[..., object], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def create_context(
    context: ContextArg,
    channels: int,
    *,
    feature_size: int | tuple[int, int] | None = None,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the context module for a residual branch of ``channels`` channels.

    ``context`` is a spec string, a class, a ``functools.partial`` or any callable taking
    ``channels`` first, or ``None`` (an ``nn.Identity`` placeholder, so every unit has the
    same hook point). ``feature_size`` (the branch's spatial size) is passed when the
    constructor accepts it; the global depthwise gather needs it. ``device`` and ``dtype``, when
    given, are passed on as PyTorch's factory arguments.
    """
    if context is None:
        return nn.Identity()
    factory = get_context(context) if isinstance(context, str) else context
    if not callable(factory):
        raise TypeError(f"context must be a spec string, a class, a callable or None, got {context!r}")
    # Only the factory arguments given: a user's own constructor need not take them.
    kwargs: dict[str, object] = {}
    if device is not None:
        kwargs["device"] = device
    if dtype is not None:
        kwargs["dtype"] = dtype
    if feature_size is not None and _accepts(factory, "feature_size"):
        kwargs["feature_size"] = feature_size
    return factory(channels, **kwargs)
