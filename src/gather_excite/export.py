"""Exported graphs of the networks: ``torch.export`` programs and ONNX files that run at any input size.

Typical use (``gex export`` does exactly this)::

    from gather_excite import create_model
    from gather_excite.export import export_onnx, onnx_max_difference, check_sizes

    model = create_model("ge_theta_plus_resnet50").eval()
    export_onnx(model, "ge.onnx", dynamic=True)          # batch, height and width symbolic
    onnx_max_difference("ge.onnx", model, check_sizes(model))   # onnxruntime against eager

With ``dynamic=True`` the height and width are symbolic: every gather computes its output size
from the input's, the excite resizes the gate to the map whatever their sizes, and a global
GE-θ/GE-θ+ resamples its learned kernel inside the graph (as it does in eager mode at a size
other than the one it was built for). With ``dynamic=False`` the graph is fixed to the example's
batch and size (by default one image at the model's ``input_size``, as deployed); there the global
gathers use their learned kernels as they are (the resampling folds away).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

__all__ = [
    "check_sizes",
    "dynamic_shapes",
    "example_input",
    "export_onnx",
    "export_program",
    "max_difference",
    "min_input_size",
    "onnx_max_difference",
]


def _input_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model, "input_size", (224, 224))
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _in_chans(model: nn.Module) -> int:
    channels = getattr(model, "channels", None)  # a context module on its own
    if isinstance(channels, int):
        return channels
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise TypeError(f"model {type(model).__name__} has no Conv2d to read the input channels from")
    return first.in_channels


def min_input_size(model: nn.Module) -> int:
    """The smallest height/width a dynamic graph admits: the deepest map is then at least 2x2.

    A map that could be 1x1 makes the tracer specialise on whether it is (size-1 dimensions
    broadcast), so the admitted range starts one pixel above the network's total stride (the
    ``reduction`` of its last ``feature_info`` entry); a module without ``feature_info`` (one
    context module) admits 2 and more.
    """
    info = getattr(model, "feature_info", None) or [{"reduction": 1}]
    return max(entry["reduction"] for entry in info) + 1


def example_input(
    model: nn.Module, *, batch: int = 2, size: tuple[int, int] | None = None, seed: int = 0
) -> torch.Tensor:
    """A fixed random image batch of the model's input size (or ``size``), on the model's device."""
    height, width = size if size is not None else _input_size(model)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, _in_chans(model), height, width, generator=generator).to(device, dtype)


def _default_example(model: nn.Module, dynamic: bool) -> torch.Tensor:
    """One image for a fixed graph; two for a dynamic one, since a traced batch of 1 would be
    specialised to 1 (size-1 dimensions broadcast)."""
    return example_input(model, batch=2 if dynamic else 1)


def check_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """Three input sizes at which the gates' shapes differ: the model's own, 10/7 of it, and a non-square one.

    For an ImageNet network (224) that is 224, 320 and 256x192: extent 8 on the 7x7 conv5_x map
    gives a 1x1 gate at 224, a 2x2 gate at 320 and a 1x1 gate on an 8x6 map at 256x192.
    """
    height, width = _input_size(model)
    floor = min_input_size(model)
    return [
        (height, width),
        (max(floor, height * 10 // 7), max(floor, width * 10 // 7)),
        (max(floor, height * 8 // 7), max(floor, width * 6 // 7)),
    ]


def dynamic_shapes(model: nn.Module, *, dynamic: bool = True) -> tuple[dict[int, Dim], ...] | None:
    """``torch.export``'s ``dynamic_shapes`` for ``model(x)``: batch, height and width symbolic (or ``None``)."""
    if not dynamic:
        return None
    floor = min_input_size(model)
    return ({0: Dim("batch", min=1), 2: Dim("height", min=floor), 3: Dim("width", min=floor)},)


@contextlib.contextmanager
def _size_oblivious(dynamic: bool) -> Iterator[None]:
    """Trace without specialising on whether a symbolic size is 1, as ``torch.onnx.export`` itself does.

    At 224 px the extent-8 gate of conv5_x is 1x1, at 320 px it is 2x2; without this the tracer
    records "this map is 1x1" as a condition of the graph. ``backed_size_oblivious`` is PyTorch's
    own (experimental) switch for that, which its ONNX exporter sets around ``torch.export``.
    """
    if not dynamic:
        yield
        return
    import torch.fx.experimental._config as shape_config

    with shape_config.patch(backed_size_oblivious=True):
        yield


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block; every submodule's own mode is put back afterwards (an export
    or a check of a model that is training leaves it training)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def export_program(model: nn.Module, *, example: torch.Tensor | None = None, dynamic: bool = True) -> ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode (batch, height, width symbolic when ``dynamic``)."""
    example = _default_example(model, dynamic) if example is None else example
    with _in_eval_mode(model), torch.no_grad(), _size_oblivious(dynamic):
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(model, dynamic=dynamic))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example: torch.Tensor | None = None,
    dynamic: bool = True,
    opset_version: int | None = None,
) -> None:
    """Write ``model`` (in eval mode; its own mode is kept) to an ONNX file through the dynamo exporter
    (``torch.onnx.export(dynamo=True)``).

    The input is named ``image`` and the output ``logits``; with ``dynamic`` their batch, height
    and width are symbolic.
    """
    example = _default_example(model, dynamic) if example is None else example
    with _in_eval_mode(model), torch.no_grad(), _size_oblivious(dynamic):
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(model, dynamic=dynamic),
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset_version,
            verbose=False,
        )
    # Written in place: `gex export` passes a temporary name and renames it once the file is checked.
    program.save(os.fspath(path))


def max_difference(
    run: object, model: nn.Module, sizes: Sequence[tuple[int, int]], *, batch: int = 2
) -> dict[str, float]:
    """Largest absolute difference between ``run(x)`` and eager ``model(x)``, per input size ``"HxW"``."""
    result: dict[str, float] = {}
    for index, size in enumerate(sizes):
        x = example_input(model, batch=batch, size=tuple(size), seed=index + 1)
        with _in_eval_mode(model), torch.no_grad():
            expected = model(x)
            got = torch.as_tensor(run(x)).to(expected.device, expected.dtype)
        result[f"{size[0]}x{size[1]}"] = (got - expected).abs().max().item()
    return result


# onnxruntime's names of the input types a network takes -> torch's dtypes.
_ONNX_DTYPES = {"tensor(float16)": torch.float16, "tensor(float)": torch.float32, "tensor(double)": torch.float64}


def onnx_max_difference(
    path: str | os.PathLike[str], model: nn.Module, sizes: Sequence[tuple[int, int]], *, batch: int = 2
) -> dict[str, float]:
    """:func:`max_difference` of an ONNX file run by onnxruntime (CPU) against eager ``model``."""
    import onnxruntime  # the `export` extra; imported here so the package does not need it

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0]
    # The input in the dtype the graph declares (a float16 export takes float16, not float32).
    dtype = _ONNX_DTYPES.get(declared.type, torch.float32)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {declared.name: x.detach().cpu().to(dtype).numpy()})[0])

    return max_difference(run, model, sizes, batch=batch)
