"""Gather-Excite (Hu, Shen, Albanie, Sun, Vedaldi, NeurIPS 2018) in PyTorch."""

from .complexity import complexity
from .data_config import DataConfig, resolve_data_config
from .layers import GatherExcite, SqueezeExcite, create_context, list_context_specs
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "DataConfig",
    "GatherExcite",
    "SqueezeExcite",
    "__version__",
    "complexity",
    "create_context",
    "create_model",
    "list_context_specs",
    "list_models",
    "resolve_data_config",
]
