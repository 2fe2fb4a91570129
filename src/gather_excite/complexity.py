"""Parameters and multiply-accumulates of a model, measured by running it, and the paper's figures.

:func:`complexity` runs one forward pass of a batch-1 input under PyTorch's
:class:`torch.utils.flop_counter.FlopCounterMode` and reports

* ``params``: ``sum(p.numel() for p in model.parameters())`` (BatchNorm running statistics,
  which are buffers, are not counted);
* ``bn_stats`` (with ``bn_stats=True``): the elements of the BatchNorm running means and variances.
  Caffe stores them as layer parameters and counts them so; ``params + bn_stats`` reproduces more of
  the paper's printed parameter counts than ``params`` alone (README, "Complexity vs the paper");
* ``macs``: half the FLOPs that ``FlopCounterMode`` counts, i.e. the multiply-accumulates of
  ``aten.convolution`` (every conv: stems, 1x1/3x3 convs, grouped and depthwise convs, the GE-θ
  depthwise gathers and the SE/GE-θ+ MLPs, which are 1x1 convs) and of ``aten.mm``/``addmm``/
  ``bmm`` (linear layers). Bias additions, BatchNorm, ReLU, pooling, sigmoid, resizing and the
  elementwise products are not counted;
* ``gate_mults``: the elementwise products ``x * gate`` of the context modules, one per
  element of each gated map (``macs`` leaves them out). The paper's GFLOPs for the ResNet
  rows agree with ``macs + gate_mults`` to the rounding of every printed digit.

The model runs in eval mode under ``torch.no_grad()`` on its own device; a model built on the
``meta`` device is measured without computing anything, which is how the tables below are made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import GatherExcite, SqueezeExcite
from .layers.context_spec import TABLE_VARIANTS, ContextSpec

__all__ = ["PAPER_ROWS", "PaperRow", "complexity", "measure_paper_row"]


def _check_input_size(input_size: object) -> tuple[int, int, int]:
    if not isinstance(input_size, Sequence) or isinstance(input_size, str) or len(input_size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {input_size!r}")
    for value in input_size:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"input_size must hold three ints >= 1 (channels, height, width), got {input_size!r}")
    return int(input_size[0]), int(input_size[1]), int(input_size[2])


def _gated_modules(model: nn.Module) -> list[nn.Module]:
    """The context modules: Gather-Excite/SE modules and any non-identity ``context`` submodule."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        is_context = name.rsplit(".", 1)[-1] == "context" and not isinstance(module, nn.Identity)
        if is_context or isinstance(module, (GatherExcite, SqueezeExcite)):
            found.setdefault(id(module), module)
    # A context module wrapping a GatherExcite would be counted twice: keep the outermost.
    inner = {id(sub) for module in found.values() for sub in module.modules() if sub is not module}
    return [module for key, module in found.items() if key not in inner]


def _model_input_size(model: nn.Module) -> Sequence[int]:
    """The ``(channels, height, width)`` a model says it takes (timm's ``pretrained_cfg["input_size"]``,
    which every registered model carries: 32 px for the CIFAR networks, ``in_chans`` channels), else
    ImageNet's ``(3, 224, 224)``."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if isinstance(size, (list, tuple)) else (3, 224, 224)


def _bn_stats(model: nn.Module) -> int:
    """Elements of the BatchNorm running means and variances (``num_batches_tracked`` is a step counter)."""
    names = ("running_mean", "running_var")
    return sum(buffer.numel() for name, buffer in model.named_buffers() if name.rsplit(".", 1)[-1] in names)


def complexity(model: nn.Module, input_size: Sequence[int] | None = None, *, bn_stats: bool = False) -> dict[str, int]:
    """``params``, ``macs`` (convs and linear layers) and ``gate_mults`` of one batch-1 forward pass.

    ``input_size`` is ``(channels, height, width)``; by default the model's own (its
    ``pretrained_cfg["input_size"]``, as timm's ``resolve_data_config`` reads it), else
    ``(3, 224, 224)``. ``bn_stats=True`` adds ``bn_stats``, the BatchNorm running statistics
    that Caffe counts as parameters. See the module docstring for exactly what each count includes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    channels, height, width = _check_input_size(_model_input_size(model) if input_size is None else input_size)
    reference = next(model.parameters(), None)
    if reference is None:
        reference = next(model.buffers(), torch.empty(0))
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    x = torch.zeros(1, channels, height, width, device=reference.device, dtype=dtype)

    gate_mults = 0

    def count_gate(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        nonlocal gate_mults
        gate_mults += output.numel()

    handles = [module.register_forward_hook(count_gate) for module in _gated_modules(model)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    counts = {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": counter.get_total_flops() // 2,
        "gate_mults": gate_mults,
    }
    if bn_stats:
        counts["bn_stats"] = _bn_stats(model)
    return counts


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's complexity tables and the registered model that it names."""

    table: int
    row: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    paper_params_m: float | None = None
    paper_gflops: float | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)

    @property
    def label(self) -> str:
        """The registry name plus the arguments used, e.g. ``ge_theta_resnet50(stages=['conv2_x'])``."""
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.model}({args})" if args else self.model


def _stage(label: str) -> dict[str, Any]:
    return {"stages": [label]}


_CIFAR = {"num_classes": 10, "input_size": 32}
_CIFAR_INPUT = (3, 32, 32)

# Tables 1-4 (ImageNet 224x224, 1000 classes) and the Table 5 networks (CIFAR-10, parameters
# only: the paper gives none). GE rows are global extent unless the row says otherwise.
PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(1, "ResNet-50 (baseline)", "resnet50", paper_params_m=25.6, paper_gflops=3.86),
    PaperRow(1, "GE-θ (stage2)", "ge_theta_resnet50", _stage("conv2_x"), 28.0, 3.86),
    PaperRow(1, "GE-θ (stage3)", "ge_theta_resnet50", _stage("conv3_x"), 27.2, 3.86),
    PaperRow(1, "GE-θ (stage4)", "ge_theta_resnet50", _stage("conv4_x"), 26.8, 3.86),
    PaperRow(1, "GE-θ (all)", "ge_theta_resnet50", paper_params_m=31.2, paper_gflops=3.87),
    PaperRow(2, "ResNet-101", "resnet101", paper_params_m=44.6, paper_gflops=7.57),
    PaperRow(2, "ResNet-50 (baseline)", "resnet50", paper_params_m=25.6, paper_gflops=3.86),
    PaperRow(2, "SE", "se_resnet50", paper_params_m=28.1, paper_gflops=3.87),
    PaperRow(2, "GE-θ−", "ge_theta_minus_resnet50", paper_params_m=25.6, paper_gflops=3.86),
    PaperRow(2, "GE-θ", "ge_theta_resnet50", paper_params_m=31.2, paper_gflops=3.87),
    PaperRow(2, "GE-θ+", "ge_theta_plus_resnet50", paper_params_m=33.7, paper_gflops=3.87),
    PaperRow(3, "ResNet-152", "resnet152", paper_params_m=60.3, paper_gflops=11.28),
    PaperRow(3, "ResNet-101 (baseline)", "resnet101", paper_params_m=44.6, paper_gflops=7.57),
    PaperRow(3, "SE", "se_resnet101", paper_params_m=49.4, paper_gflops=7.58),
    PaperRow(3, "GE-θ−", "ge_theta_minus_resnet101", paper_params_m=44.6, paper_gflops=7.58),
    PaperRow(3, "GE-θ", "ge_theta_resnet101", paper_params_m=53.7, paper_gflops=7.59),
    PaperRow(3, "GE-θ+", "ge_theta_plus_resnet101", paper_params_m=58.4, paper_gflops=7.59),
    PaperRow(4, "ShuffleNet (baseline)", "shufflenet_g3", paper_params_m=1.9, paper_gflops=0.1375),
    PaperRow(4, "SE", "se_shufflenet_g3", paper_params_m=2.5, paper_gflops=0.1399),
    PaperRow(4, "GE-θ (E2)", "ge_theta_e2_shufflenet_g3", paper_params_m=2.0, paper_gflops=0.1389),
    PaperRow(4, "GE-θ (E4)", "ge_theta_e4_shufflenet_g3", paper_params_m=2.1, paper_gflops=0.1391),
    PaperRow(4, "GE-θ (E8)", "ge_theta_e8_shufflenet_g3", paper_params_m=2.2, paper_gflops=0.1392),
    PaperRow(4, "GE-θ", "ge_theta_shufflenet_g3", paper_params_m=3.6, paper_gflops=0.1408),
    PaperRow(4, "GE-θ+", "ge_theta_plus_shufflenet_g3", paper_params_m=4.4, paper_gflops=0.1416),
    *(
        PaperRow(5, f"{network} {variant}", f"{prefix}{model}", dict(_CIFAR), input_size=_CIFAR_INPUT)
        for network, model in (
            ("ResNet-110", "cifar_resnet110"),
            ("ResNet-164", "cifar_resnet164"),
            ("WRN-16-8", "wrn16_8"),
        )
        for variant, prefix in (
            ("baseline", ""),
            *((ContextSpec(name).label, f"{name}_") for name in TABLE_VARIANTS),
        )
    ),
)


def measure_paper_row(row: PaperRow, *, device: str | torch.device = "meta") -> dict[str, Any]:
    """Build the row's model (on the ``meta`` device by default: nothing is allocated) and count it.

    Returns the keys of ``gex complexity --json``: ``table``, ``row``, ``model``, ``params``,
    ``bn_stats``, ``macs``, ``gate_mults``, ``paper_params_m``, ``paper_gflops``.
    """
    from .models import create_model

    kwargs = dict(row.kwargs)
    num_classes = kwargs.pop("num_classes", 1000)
    with torch.device(device):
        model = create_model(row.model, num_classes=num_classes, **kwargs)
    counts = complexity(model, row.input_size, bn_stats=True)
    return {
        "table": row.table,
        "row": row.row,
        "model": row.label,
        "params": counts["params"],
        "bn_stats": counts["bn_stats"],
        "macs": counts["macs"],
        "gate_mults": counts["gate_mults"],
        "paper_params_m": row.paper_params_m,
        "paper_gflops": row.paper_gflops,
    }
