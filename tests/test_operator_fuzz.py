"""Hypothesis fuzz of GatherExcite / SqueezeExcite against a plain composition written here from the paper.

The reference is built from the definitions in Section 3, not from the library's modules: the
selection window iota(u, e) of (2e-1)x(2e-1) centred on e*u, log2(e) depthwise 3x3 stride-2 convs
with BatchNorm (batch statistics in training, running ones in evaluation), a global depthwise conv
whose kernel covers the map, the SE MLP, sigmoid, nearest-neighbour resize and the product. Only
the learned weights are shared with the module under test.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gather_excite.layers import GatherExcite, SqueezeExcite

settings.register_profile("operator", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("operator-slow", max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))

VARIANTS = [(gather, excite, extent) for gather in ("avg", "max", "conv") for excite in ("plain", "mlp")
            for extent in (None, 2, 4, 8)] + [("se", "mlp", None)]  # fmt: skip


def window(u: int, extent: int, size: int) -> slice:
    """Rows (or columns) of iota(u, e): the (2e-1)-wide window centred on e*u, clipped to the map."""
    return slice(max(0, extent * u - (extent - 1)), min(size, extent * u + extent))


def pool_reference(x: torch.Tensor, extent: int | None, mode: str) -> torch.Tensor:
    reduce = (lambda t: t.mean((2, 3))) if mode == "avg" else (lambda t: t.amax((2, 3)))
    if extent is None:
        return reduce(x)[..., None, None]
    rows, cols = math.ceil(x.shape[2] / extent), math.ceil(x.shape[3] / extent)
    columns = [
        torch.stack(
            [reduce(x[:, :, window(i, extent, x.shape[2]), window(j, extent, x.shape[3])]) for j in range(cols)], -1
        )
        for i in range(rows)
    ]
    return torch.stack(columns, -2)


def batch_norm_reference(y: torch.Tensor, bn: torch.nn.BatchNorm2d, training: bool) -> torch.Tensor:
    if training and y.shape[0] == 0:
        return y  # an empty batch has no statistics; the composition's result is the empty map
    if training:
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean.to(y.dtype), bn.running_var.to(y.dtype)
    shape = (1, -1, 1, 1)
    return (y - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def conv_reference(x: torch.Tensor, module: GatherExcite, training: bool) -> torch.Tensor:
    gather = module.gather
    if module.extent is None:
        y = F.conv2d(x, gather.conv.weight.to(x.dtype), groups=x.shape[1])
        return batch_norm_reference(y, gather.bn, training)
    convs = [layer for layer in gather.layers if isinstance(layer, torch.nn.Conv2d)]
    norms = [layer for layer in gather.layers if isinstance(layer, torch.nn.BatchNorm2d)]
    for index, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
        if index > 0:
            x = torch.relu(x)
        x = batch_norm_reference(
            F.conv2d(x, conv.weight.to(x.dtype), stride=2, padding=1, groups=x.shape[1]), norm, training
        )
    return x


def mlp_reference(z: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
    hidden = torch.relu(F.conv2d(z, mlp.fc1.weight.to(z.dtype), mlp.fc1.bias.to(z.dtype)))
    return F.conv2d(hidden, mlp.fc2.weight.to(z.dtype), mlp.fc2.bias.to(z.dtype))


def nearest(gate: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize: output index i reads input floor(i * in / out), the scale rounded to float32."""

    def sources(before: int, after: int) -> list[int]:
        scale = float(torch.tensor(before / after, dtype=torch.float32))
        return [min(math.floor(index * scale), before - 1) for index in range(after)]

    return gate[:, :, sources(gate.shape[2], size[0])][:, :, :, sources(gate.shape[3], size[1])]


def reference(x: torch.Tensor, module: torch.nn.Module, gather: str, training: bool) -> torch.Tensor:
    """The paper's composition in ``x``'s dtype (float64 or float32)."""
    if gather == "se":
        logits = mlp_reference(x.mean((2, 3), keepdim=True), module.mlp)
    else:
        logits = conv_reference(x, module, training) if gather == "conv" else pool_reference(x, module.extent, gather)
        if module.mlp is not None:
            logits = mlp_reference(torch.relu(logits) if gather == "conv" else logits, module.mlp)
    return x * nearest(torch.sigmoid(logits), x.shape[-2:])


def build(gather: str, excite: str, extent: int | None, channels: int, size: tuple[int, int]) -> torch.nn.Module:
    if gather == "se":
        module = SqueezeExcite(channels, reduction=2)
    else:
        module = GatherExcite(channels, extent, gather=gather, excite=excite, feature_size=size, reduction=2)
    with torch.no_grad():
        for name, value in module.named_parameters():
            value.copy_(torch.randn_like(value) * (0.5 if "weight" in name else 0.2))
        for norm in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return module


@st.composite
def cases(draw: st.DrawFn) -> dict[str, object]:
    gather, excite, extent = draw(st.sampled_from(VARIANTS))
    return {
        "variant": (gather, excite, extent),
        "batch": draw(st.integers(0, 3)),
        "channels": draw(st.integers(1, 6)),
        "size": (draw(st.integers(1, 11)), draw(st.integers(1, 11))),
        "precision": draw(st.sampled_from(["float32", "float64", "bf16-autocast"])),
        "channels_last": draw(st.booleans()),
        "training": draw(st.booleans()),
        "grad": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def check_against_reference(case: dict[str, object]) -> None:
    gather, excite, extent = case["variant"]
    batch, channels, size = case["batch"], case["channels"], case["size"]
    torch.manual_seed(case["seed"])
    module = build(gather, excite, extent, channels, size).train(case["training"])
    dtype = torch.float64 if case["precision"] == "float64" else torch.float32
    module = module.to(dtype)
    x = torch.randn(batch, channels, *size, dtype=dtype)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(case["grad"])
    # BatchNorm in training needs more than one value per channel, in the module as in the reference.
    gathered = (1, 1) if extent is None else (math.ceil(size[0] / extent), math.ceil(size[1] / extent))
    values = batch * gathered[0] * gathered[1]  # per channel, in the conv gather's BatchNorm
    if gather == "conv" and case["training"] and values == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module(x)
        return
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if case["precision"] == "bf16-autocast" else nullcontext()
    with torch.set_grad_enabled(case["grad"]), autocast:
        out = module(x)
    reference_input = x.detach().clone().requires_grad_(case["grad"])
    with torch.set_grad_enabled(case["grad"]):
        expected = reference(reference_input, module, gather, case["training"])
    assert out.shape == x.shape and out.dtype == x.dtype
    tolerance = {"float64": 1e-10, "float32": 1e-5, "bf16-autocast": 4e-2}[case["precision"]]
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    if case["grad"] and batch > 0:
        weights = torch.randn_like(expected)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), reference_input)
        # bf16 rounding of the gate logits reaches the gradient through the sigmoid's slope too.
        grad_tolerance = tolerance if case["precision"] != "bf16-autocast" else 1e-1
        # A training BN in the gather divides by the spread of its few values per channel, which
        # can be as small as rounding: its gradient amplifies rounding by up to 1/sqrt(eps) = 316.
        # Seen: float32 over 2 values, 1.8e-4; bf16 over 8 values, 17x. float64 checks these cases
        # at 1e-10; tests/test_cuda.py compares bf16 gradients of whole networks with the plain path.
        if gather == "conv" and case["training"] and (case["precision"] == "bf16-autocast" or values <= 4):
            return
        torch.testing.assert_close(grad, expected_grad, atol=grad_tolerance, rtol=grad_tolerance)


@settings(settings.get_profile("operator"))
@given(case=cases())
def test_operator_equals_the_paper_composition(case: dict[str, object]) -> None:
    check_against_reference(case)


@pytest.mark.slow
@settings(settings.get_profile("operator-slow"))
@given(case=cases())
def test_operator_equals_the_paper_composition_many_cases(case: dict[str, object]) -> None:
    check_against_reference(case)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32, torch.bool])
@pytest.mark.parametrize("variant", ["ge_avg", "ge_conv", "se"])
def test_integer_maps_are_refused_naming_the_dtype(dtype: torch.dtype, variant: str) -> None:
    module = {
        "ge_avg": lambda: GatherExcite(4, 2),
        "ge_conv": lambda: GatherExcite(4, None, gather="conv", feature_size=6),
        "se": lambda: SqueezeExcite(4, reduction=2),
    }[variant]()
    # An integer map used to give zeros (GE-θ−: the gate truncated to 0) instead of an error.
    with pytest.raises(TypeError, match=rf"floating-point tensor .*got {dtype}"):
        module(torch.ones(2, 4, 6, 6, dtype=dtype))
