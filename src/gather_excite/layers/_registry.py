"""Context modules by name: the short spec strings that the model zoo and the CLI use.

``"se"``, ``"ge_theta_minus"``, ``"ge_theta"``, ``"ge_theta_plus"`` are the paper's global
variants; a suffix ``_e2`` / ``_e4`` / ``_e8`` picks the extent ratio, and
``"ge_theta_minus_max"`` swaps average for max pooling (the supplement's study).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable

from torch import nn

from .gather_excite import GatherExcite, SqueezeExcite

__all__ = ["CONTEXT_SPECS", "ContextArg", "create_context", "get_context", "list_context_specs"]

ContextArg = str | type[nn.Module] | Callable[..., nn.Module] | None

_VARIANTS = {
    "ge_theta_minus": {"gather": "avg", "excite": "plain"},
    "ge_theta_minus_max": {"gather": "max", "excite": "plain"},
    "ge_theta": {"gather": "conv", "excite": "plain"},
    "ge_theta_plus": {"gather": "conv", "excite": "mlp"},
}

CONTEXT_SPECS: dict[str, Callable[..., nn.Module]] = {"se": SqueezeExcite}
for _name, _kwargs in _VARIANTS.items():
    CONTEXT_SPECS[_name] = functools.partial(GatherExcite, extent=None, **_kwargs)
    for _extent in (2, 4, 8):
        CONTEXT_SPECS[f"{_name}_e{_extent}"] = functools.partial(GatherExcite, extent=_extent, **_kwargs)


def list_context_specs() -> list[str]:
    """All known spec strings, sorted."""
    return sorted(CONTEXT_SPECS)


def get_context(spec: str) -> Callable[..., nn.Module]:
    """The constructor (class or partial) that a spec string names."""
    if not isinstance(spec, str):
        raise TypeError(f"context spec must be a str, got {type(spec).__name__}")
    try:
        return CONTEXT_SPECS[spec]
    except KeyError:
        close = difflib.get_close_matches(spec, CONTEXT_SPECS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown context spec {spec!r}.{hint} Known specs: {', '.join(list_context_specs())}"
        ) from None


def _accepts(fn: Callable[..., object], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def create_context(
    context: ContextArg, channels: int, *, feature_size: int | tuple[int, int] | None = None
) -> nn.Module:
    """Build the context module for a residual branch of ``channels`` channels.

    ``context`` is a spec string, a class, a ``functools.partial`` or any callable taking
    ``channels`` first, or ``None`` (an ``nn.Identity`` placeholder, so every unit has the
    same hook point). ``feature_size`` (the branch's spatial size) is passed when the
    constructor accepts it; the global depthwise gather needs it.
    """
    if context is None:
        return nn.Identity()
    factory = get_context(context) if isinstance(context, str) else context
    if not callable(factory):
        raise TypeError(f"context must be a spec string, a class, a callable or None, got {context!r}")
    if feature_size is not None and _accepts(factory, "feature_size"):
        return factory(channels, feature_size=feature_size)
    return factory(channels)
