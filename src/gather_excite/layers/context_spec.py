"""The vocabulary of context modules: one :class:`ContextSpec` per spec string, and the paper's labels.

A spec string is a variant, optionally followed by an extent suffix: ``"se"``,
``"ge_theta_minus"``, ``"ge_theta"``, ``"ge_theta_plus"`` (the paper's global variants, Section 3)
and ``"ge_theta_minus_max"`` (max instead of average pooling, the supplement's study); ``_e2`` /
``_e4`` / ``_e8`` picks the extent ratio of a GE variant. Everything else that names a context
module (the layer and model registries, the CLI, the analyses) derives from :data:`VARIANTS`
and :class:`ContextSpec` here, so a new variant is one line in :data:`VARIANTS`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .gather_excite import GatherExcite, SqueezeExcite

__all__ = [
    "EXTENTS",
    "GE_VARIANTS",
    "TABLE_VARIANTS",
    "VARIANTS",
    "ContextSpec",
    "Variant",
    "context_specs",
]


class Variant(NamedTuple):
    """One context-module family: its paper label and how it gathers and excites.

    ``gather``/``excite`` are :class:`GatherExcite`'s arguments (``None`` for SE, which is its
    own class); ``timm`` holds the arguments of ``timm.layers.GatherExcite`` that build the same
    operator, or ``None`` where timm has no equivalent.
    """

    label: str
    gather: str | None
    excite: str | None
    timm: dict[str, bool] | None


VARIANTS: dict[str, Variant] = {
    "se": Variant("SE", None, None, {"extra_params": False, "use_mlp": True}),
    "ge_theta_minus": Variant("GE-θ−", "avg", "plain", {"extra_params": False, "use_mlp": False}),
    "ge_theta_minus_max": Variant("GE-θ− (max)", "max", "plain", None),
    "ge_theta": Variant("GE-θ", "conv", "plain", {"extra_params": True, "use_mlp": False}),
    "ge_theta_plus": Variant("GE-θ+", "conv", "mlp", {"extra_params": True, "use_mlp": True}),
}
# The extent ratios the paper studies (Figure 2, Table 4); every GE variant is also global.
EXTENTS: tuple[int, ...] = (2, 4, 8)
# The rows of the paper's Tables 2, 3 and 5, in its order (all at global extent).
TABLE_VARIANTS: tuple[str, ...] = ("se", "ge_theta_minus", "ge_theta", "ge_theta_plus")
# The three GE variants of the paper's main tables.
GE_VARIANTS: tuple[str, ...] = TABLE_VARIANTS[1:]

_EXTENT_SUFFIX = "_e"


@dataclass(frozen=True)
class ContextSpec:
    """A context module named by a spec string: a variant of :data:`VARIANTS` and an extent.

    Args:
        variant: a key of :data:`VARIANTS` (``"se"``, ``"ge_theta"``, ...).
        extent: the extent ratio (one of :data:`EXTENTS`), or ``None`` for global extent.
    """

    variant: str
    extent: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.extent is not None and (self.variant == "se" or self.extent not in EXTENTS):
            allowed = "None (SE has no extent)" if self.variant == "se" else f"None or one of {EXTENTS}"
            raise ValueError(f"extent of {self.variant!r} must be {allowed}, got {self.extent!r}")

    @classmethod
    def parse(cls, spec: str) -> ContextSpec:
        """The spec that a string names: ``"ge_theta_e8"`` -> ``ContextSpec("ge_theta", 8)``."""
        if not isinstance(spec, str):
            raise TypeError(f"context spec must be a str, got {type(spec).__name__}")
        variant, extent = spec, None
        base, sep, suffix = spec.rpartition(_EXTENT_SUFFIX)
        if sep and suffix.isdigit():
            variant, extent = base, int(suffix)
        try:
            parsed = cls(variant, extent)
            if parsed.name != spec:  # "ge_theta_e08" is not a name, though it parses
                raise ValueError(spec)
            return parsed
        except ValueError:
            names = [s.name for s in context_specs()]
            close = difflib.get_close_matches(spec, names, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown context spec {spec!r}.{hint} Known specs: {', '.join(sorted(names))}") from None

    @property
    def name(self) -> str:
        """The spec string: ``"ge_theta_e8"``, ``"se"``."""
        return self.variant if self.extent is None else f"{self.variant}{_EXTENT_SUFFIX}{self.extent}"

    @property
    def label(self) -> str:
        """The paper's name of the variant, extent left out: ``"GE-θ"``, ``"SE"``."""
        return VARIANTS[self.variant].label

    @property
    def paper_label(self) -> str:
        """The paper's name with the extent: ``"GE-θ (E8)"``, ``"GE-θ (global)"``, ``"SE"``."""
        if self.variant == "se":
            return self.label
        return f"{self.label} ({'global' if self.extent is None else f'E{self.extent}'})"

    @property
    def factory(self) -> Callable[..., nn.Module]:
        """The class or ``functools.partial`` that builds the module from ``channels`` (and ``feature_size``)."""
        variant = VARIANTS[self.variant]
        if variant.gather is None:
            return SqueezeExcite
        return functools.partial(GatherExcite, extent=self.extent, gather=variant.gather, excite=variant.excite)

    @property
    def timm_kwargs(self) -> dict[str, object] | None:
        """Arguments of ``timm.layers.GatherExcite`` (besides channels and ``feat_size``) for the same operator."""
        timm = VARIANTS[self.variant].timm
        return None if timm is None else {**timm, "extent": self.extent or 0}

    def build(self, channels: int, *, feature_size: int | tuple[int, int] | None = None) -> nn.Module:
        """The module for a branch of ``channels`` channels and spatial size ``feature_size``."""
        if self.variant == "se":
            return self.factory(channels)
        return self.factory(channels, feature_size=feature_size)


@functools.cache
def context_specs() -> tuple[ContextSpec, ...]:
    """Every spec: each variant at global extent, then (for GE variants) at each of :data:`EXTENTS`."""
    return tuple(
        ContextSpec(variant, extent)
        for variant in VARIANTS
        for extent in ((None,) if variant == "se" else (None, *EXTENTS))
    )
