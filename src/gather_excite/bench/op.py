"""`gex bench op`: BN + each context module at ResNet-50's stage shapes, ours vs plain vs timm.

Forward+backward time (interleaved, paired ratios) and saved-activation bytes of the lean path,
the plain PyTorch composition and timm's ``GatherExcite`` (where timm builds the variant).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

from ..layers import create_context
from ..layers.context_spec import EXTENTS, GE_VARIANTS, ContextSpec
from ..layers.norm_context import BatchNorm2d, NormContext
from .lean import lean_path
from .memory import TrainStep, saved_bytes
from .timing import paired_ratio, time_samples

__all__ = ["OP_VARIANTS", "STAGES", "bench_op"]

# ResNet-50's residual-branch outputs (channels, size) at 224 px: conv2_x .. conv5_x.
STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))
# The GE variants of the paper's main tables at every extent, then SE.
OP_VARIANTS = (
    *(ContextSpec(variant, extent).name for variant in GE_VARIANTS for extent in (*EXTENTS, None)),
    "se",
)


def _timm_context(spec: str, channels: int, size: int) -> tuple[nn.Module | None, str | None]:
    """timm's ``GatherExcite`` for the same variant, or ``(None, why)`` where timm cannot build it."""
    try:
        from timm.layers import GatherExcite as TimmGatherExcite
    except ImportError as err:
        return None, f"timm not installed ({err})"
    kwargs = ContextSpec.parse(spec).timm_kwargs
    if kwargs is None:
        return None, f"timm's GatherExcite has no equivalent of {spec!r}"
    try:
        return TimmGatherExcite(channels, feat_size=(size, size), **kwargs), None
    except Exception as err:  # report whatever timm raises; the benchmark does not work around it
        return None, f"{type(err).__name__}: {err}"


def _op_step(bn: nn.Module, context: nn.Module, z: torch.Tensor, grad: torch.Tensor, *, lean: bool) -> TrainStep:
    modules = (bn, context)
    norm_context = NormContext(lean=True)  # lean_path(lean) below picks the path

    def forward() -> torch.Tensor:
        for m in modules:
            m.zero_grad(set_to_none=True)
        z.grad = None
        with lean_path(lean):
            return norm_context(z, bn, context)

    return TrainStep(forward, lambda out: out.backward(grad))


def bench_op(
    *,
    variants: tuple[str, ...] = OP_VARIANTS,
    stages: tuple[tuple[int, int], ...] = STAGES,
    batch: int = 8,
    repeats: int = 7,
    channels_last: bool = False,
    clock: str = "wall",
    progress: Callable[[dict], None] | None = None,
) -> list[dict[str, object]]:
    """Forward+backward of BN + each context module: ours vs the plain composition vs timm's."""
    rows = []
    for spec in variants:
        for channels, size in stages:
            torch.manual_seed(0)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            z = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt).requires_grad_()
            grad = torch.randn_like(z)
            bn = BatchNorm2d(channels)
            context = create_context(spec, channels, feature_size=size)
            timm_context, timm_error = _timm_context(spec, channels, size)
            steps = {
                "bn_only": _op_step(bn, nn.Identity(), z, grad, lean=False),
                "plain": _op_step(bn, context, z, grad, lean=False),
                "ours": _op_step(bn, context, z, grad, lean=True),
            }
            if timm_context is not None:
                steps["timm"] = _op_step(bn, timm_context, z, grad, lean=False)
            # The counted run doubles as the warm-up.
            memory = {name: saved_bytes(step, exclude=(bn, context)) for name, step in steps.items()}
            samples = time_samples(steps, repeats=repeats, warmup=0, clock=clock)
            seconds = {name: statistics.median(values) for name, values in samples.items()}
            row: dict[str, object] = {
                "variant": spec, "channels": channels, "size": size, "batch": batch, "clock": clock,
                "channels_last": channels_last,
                "seconds": seconds, "saved_bytes": memory, "timm_error": timm_error,
                "time_vs_plain": paired_ratio(samples, "ours", "plain")[0],
                "bytes_vs_plain": memory["ours"] / memory["plain"],
                "time_vs_timm": paired_ratio(samples, "ours", "timm")[0] if "timm" in samples else None,
                "bytes_vs_timm": memory["ours"] / memory["timm"] if "timm" in memory else None,
            }  # fmt: skip
            rows.append(row)
            if progress:
                progress(row)
    return rows
