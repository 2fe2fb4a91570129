"""BatchNorm followed by a context module, as every residual unit applies it.

Every backbone calls :func:`bn_context` at the end of its residual branch, so that a
memory-lean implementation can replace the plain composition in one place.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["bn_context"]


def bn_context(bn: nn.Module, context: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``context(bn(x))``: the residual branch's last BatchNorm, then its context module."""
    return context(bn(x))
