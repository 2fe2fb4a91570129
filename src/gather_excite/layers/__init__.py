"""Gather-Excite operators: gathers, excites and their registry of spec strings."""

from ._registry import CONTEXT_SPECS, create_context, get_context, list_context_specs
from .context_spec import ContextSpec, context_specs
from .gather import ConvGather, GlobalConvGather, PoolGather, resample_kernel
from .gather_excite import ExciteMLP, GateProbe, GatherExcite, SqueezeExcite

__all__ = [
    "CONTEXT_SPECS",
    "ContextSpec",
    "ConvGather",
    "ExciteMLP",
    "GateProbe",
    "GatherExcite",
    "GlobalConvGather",
    "PoolGather",
    "SqueezeExcite",
    "context_specs",
    "create_context",
    "get_context",
    "list_context_specs",
    "resample_kernel",
]
