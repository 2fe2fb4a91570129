"""PyTorch's factory arguments: every module takes ``device=`` and ``dtype=``, so timm can build our layers.

timm passes ``device``/``dtype`` to every layer it builds, its ``attn_layer`` included; a layer
that rejects them cannot be plugged into timm's ResNet (issue 11).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from gather_excite import create_model, list_models
from gather_excite.layers import (
    ConvGather,
    ExciteMLP,
    GateProbe,
    GatherExcite,
    GlobalConvGather,
    PoolGather,
    SqueezeExcite,
    create_context,
    list_context_specs,
)
from gather_excite.models.cifar_resnet import BasicUnit, PadShortcut
from gather_excite.models.preact_resnet import PreActBasic, PreActBottleneck
from gather_excite.models.resnet import Bottleneck
from gather_excite.models.shufflenet import ShuffleUnit

FACTORY = {"device": "meta", "dtype": torch.float64}


def _placements(module: torch.nn.Module) -> set[tuple[str, torch.dtype]]:
    """(device type, dtype) of every floating parameter and buffer."""
    tensors = [*module.parameters(), *module.buffers()]
    return {(t.device.type, t.dtype) for t in tensors if t.is_floating_point()}


LAYERS = {
    "PoolGather": lambda dd: PoolGather(4, **dd),
    "ConvGather": lambda dd: ConvGather(8, 4, **dd),
    "GlobalConvGather": lambda dd: GlobalConvGather(8, 5, **dd),
    "ExciteMLP": lambda dd: ExciteMLP(8, 4, **dd),
    "GateProbe": lambda dd: GateProbe(**dd),
    "GatherExcite": lambda dd: GatherExcite(8, None, gather="conv", excite="mlp", feature_size=5, **dd),
    "SqueezeExcite": lambda dd: SqueezeExcite(8, **dd),
    "Bottleneck": lambda dd: Bottleneck(16, 4, stride=2, context_layer="ge_theta_plus", feature_size=(3, 3), **dd),
    "BasicUnit": lambda dd: BasicUnit(8, 16, stride=2, context_layer="ge_theta_e2", **dd),
    "PadShortcut": lambda dd: PadShortcut(8, 16, stride=2, **dd),
    "PreActBottleneck": lambda dd: PreActBottleneck(8, 4, stride=2, context_layer="se", **dd),
    "PreActBasic": lambda dd: PreActBasic(8, 8, context_layer="ge_theta", feature_size=4, **dd),
    "ShuffleUnit": lambda dd: ShuffleUnit(24, 48, stride=2, groups=3, mid_chs=12, context_layer="ge_theta_e4", **dd),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_places_every_tensor_where_asked(name):
    """Built on the meta device in float64, the layer holds nothing anywhere else (or nothing at all)."""
    module = LAYERS[name](FACTORY)
    assert _placements(module) <= {("meta", torch.float64)}
    if name not in ("PoolGather", "GateProbe", "PadShortcut"):
        assert _placements(module) == {("meta", torch.float64)}


@pytest.mark.parametrize("spec", list_context_specs())
def test_every_context_spec_takes_factory_arguments(spec):
    module = create_context(spec, 8, feature_size=4, **FACTORY)
    assert _placements(module) <= {("meta", torch.float64)}


def test_float64_module_runs_on_float64_input():
    """``dtype=torch.float64`` gives a module that computes in float64 (no float32 anywhere)."""
    module = GatherExcite(8, 2, gather="conv", excite="mlp", dtype=torch.float64).eval()
    out = module(torch.randn(2, 8, 6, 6, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("name", ["ge_theta_plus_resnet50", "ge_theta_e8_cifar_resnet20", "se_shufflenet_g3",
                                  "ge_theta_minus_wrn16_8", "ge_theta_cifar_resnet164"])  # fmt: skip
def test_models_take_factory_arguments(name):
    assert _placements(create_model(name, **FACTORY)) == {("meta", torch.float64)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_factory_arguments(name):
    assert _placements(create_model(name, **FACTORY)) == {("meta", torch.float64)}


# The four variants of issue 11 as timm's attn_layer (timm calls attn_layer(channels, device=, dtype=)).
TIMM_ATTN = {
    "ge_theta_minus": functools.partial(GatherExcite, extent=None, gather="avg"),
    "ge_theta_e8": functools.partial(GatherExcite, extent=8, gather="conv"),
    "ge_theta_plus_e8": functools.partial(GatherExcite, extent=8, gather="conv", excite="mlp"),
    "se": SqueezeExcite,
}


@pytest.mark.parametrize("variant", sorted(TIMM_ATTN))
def test_timm_resnet50_with_our_attn_layer_trains(variant):
    """timm's ResNet-50 builds our module in each of its 16 bottlenecks, where and in the dtype
    asked of timm, and a forward/backward pass reaches every parameter of them."""
    timm = pytest.importorskip("timm")
    attn = TIMM_ATTN[variant]
    cls = attn.func if isinstance(attn, functools.partial) else attn
    placed = timm.create_model("resnet50", num_classes=5, block_args={"attn_layer": attn}, **FACTORY)
    assert _placements(placed) == {("meta", torch.float64)}
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=5, block_args={"attn_layer": attn})
    ours = [m for m in model.modules() if type(m) is cls]
    assert len(ours) == 3 + 4 + 6 + 3  # one per bottleneck
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    for module in ours:
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
