"""Gather-Excite operators: gathers, excites and their registry of spec strings."""

from ._registry import CONTEXT_SPECS, create_context, get_context, list_context_specs
from .context_spec import ContextSpec, context_specs
from .gather import ConvGather, GatherSplit, GlobalConvGather, PoolGather, resample_kernel
from .gather_excite import ExciteMLP, GateProbe, GatherExcite, SqueezeExcite
from .norm_context import BatchNorm2d, NormContext, lean_enabled, set_lean

__all__ = [
    "CONTEXT_SPECS",
    "BatchNorm2d",
    "ContextSpec",
    "ConvGather",
    "ExciteMLP",
    "GateProbe",
    "GatherExcite",
    "GatherSplit",
    "GlobalConvGather",
    "NormContext",
    "PoolGather",
    "SqueezeExcite",
    "context_specs",
    "create_context",
    "get_context",
    "lean_enabled",
    "list_context_specs",
    "resample_kernel",
    "set_lean",
]
