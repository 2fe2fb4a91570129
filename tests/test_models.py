"""The paper's networks and the registry: build, run, load torchvision weights, context placement."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

import gather_excite
from gather_excite.layers import GatherExcite, list_context_specs
from gather_excite.models import (
    BACKBONES,
    CONTEXT_NAMES,
    CifarResNet,
    PreActResNet,
    ResNet,
    ShuffleNet,
    WideResNet,
    create_model,
    list_models,
    residual_units,
)
from gather_excite.models._builder import conv_out_size
from gather_excite.models.shufflenet import ShuffleUnit

CIFAR_BACKBONES = ("cifar_resnet20", "cifar_resnet56", "cifar_resnet110", "cifar_resnet164", "wrn16_8")
DEEP_RESNETS = ("resnet101", "resnet152")
NUM_CLASSES = 7  # odd, so that no width coincides with a class count by accident


def _backbone(name: str) -> str:
    return next(b for b in sorted(BACKBONES, key=len, reverse=True) if name.endswith(b))


def _small_input_size(name: str) -> int:
    return 32 if _backbone(name) in CIFAR_BACKBONES else 64


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_holds_every_name_of_the_issue() -> None:
    # 9 backbones x (baseline + SE + 4 GE variants x 4 extents) = 9 x 18 = 162 names: every layer
    # spec (ge_theta_minus_max[_eN] included, 17 specs) is a model name for every backbone.
    names = list_models()
    assert len(names) == 162
    for name in (
        "resnet50",
        "se_resnet50",
        "ge_theta_minus_resnet50",
        "ge_theta_resnet50",
        "ge_theta_plus_resnet50",
        "ge_theta_e8_resnet50",
        "ge_theta_minus_e4_resnet50",
        "ge_theta_plus_resnet152",
        "se_shufflenet_g3",
        "ge_theta_e2_shufflenet_g3",
        "ge_theta_cifar_resnet110",
        "ge_theta_plus_cifar_resnet164",
        "se_wrn16_8",
        "ge_theta_minus_cifar_resnet20",
        "ge_theta_cifar_resnet56",
        "ge_theta_minus_max_resnet50",
        "ge_theta_minus_max_e8_wrn16_8",
    ):
        assert name in names
    assert names == sorted(names)


def test_list_models_filters_by_fnmatch_pattern() -> None:
    # baseline, se, and 4 GE variants x 4 extents end in "_resnet50" or are "resnet50": 18.
    assert len(list_models("*resnet50")) == 18
    assert list_models("se_*shufflenet*") == ["se_shufflenet_g3"]
    assert list_models("no_such_*") == []


def test_every_context_name_is_a_layers_spec() -> None:
    # The registry must not name a context module that create_context cannot build, and every
    # spec that create_context builds is a model name with every backbone.
    assert set(CONTEXT_NAMES) == set(list_context_specs())
    names = set(list_models())
    assert {f"{spec}_{backbone}" for spec in list_context_specs() for backbone in BACKBONES} <= names


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="ge_theta_resnet50"):
        create_model("ge_theta_resnt50")
    with pytest.raises(TypeError, match="str"):
        create_model(50)  # type: ignore[arg-type]


def test_named_context_cannot_be_overridden() -> None:
    with pytest.raises(ValueError, match="context_layer"):
        create_model("se_cifar_resnet20", context_layer="ge_theta")


def test_baseline_name_accepts_any_context_layer() -> None:
    model = create_model("cifar_resnet20", num_classes=10, context_layer=functools.partial(GatherExcite, extent=2))
    contexts = [unit.context for _, unit in residual_units(model)]
    assert len(contexts) == 9 and all(isinstance(c, GatherExcite) and c.extent == 2 for c in contexts)


def test_package_exports() -> None:
    assert gather_excite.create_model is create_model
    assert gather_excite.list_models is list_models


# ---------------------------------------------------------------------------------------------
# Every registered model builds and trains one step at a small input with an odd class count


def _forward_backward(name: str) -> list[str]:
    """Names of the parameters that got no finite gradient from a forward+backward at a small input."""
    size = _small_input_size(name)
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, input_size=size)
    # Batch 2: a global gather's BatchNorm sees one value per channel and sample in training mode.
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, NUM_CLASSES)
    logits.logsumexp(1).sum().backward()
    return [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]


# ResNet-101/152 differ from ResNet-50 only in unit counts and are the costliest to build and
# train one step: the default run covers their baseline and GE-θ+ (every part a context module
# can have); the others run with the slow tests.
_DEEP_DEFAULT = {"resnet101", "ge_theta_plus_resnet101", "resnet152", "ge_theta_plus_resnet152"}
# The max-pool gather is GE-θ−'s parameter-free gather with another pooling: the default run
# builds it on ResNet-20 at every extent and on ResNet-50 once; the other 31 run with the slow tests.
_MAX_DEFAULT = {f"{spec}_cifar_resnet20" for spec in CONTEXT_NAMES if "_max" in spec} | {"ge_theta_minus_max_resnet50"}


def _is_slow(name: str) -> bool:
    if "_max" in name:
        return name not in _MAX_DEFAULT
    return _backbone(name) in DEEP_RESNETS and name not in _DEEP_DEFAULT


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if _is_slow(name) else name for name in list_models()]
)
def test_model_forward_backward(name: str) -> None:
    assert _forward_backward(name) == []


def test_fashion_mnist_input() -> None:
    # gex compare trains the ResNet-20 family on 1-channel 28x28 images.
    model = create_model("ge_theta_plus_cifar_resnet20", num_classes=10, in_chans=1, input_size=28)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    kernels = [unit.context.gather.conv.kernel_size for _, unit in residual_units(model)]
    assert kernels == [(28, 28)] * 3 + [(14, 14)] * 3 + [(7, 7)] * 3


# ---------------------------------------------------------------------------------------------
# Feature sizes, feature_info and stage names


@pytest.mark.parametrize(
    ("name", "input_size", "expected"),
    [
        # reference.md: the authors' global depthwise kernels at 224 px are 56/28/14/7.
        ("ge_theta_resnet50", 224, {"conv2_x": 56, "conv3_x": 28, "conv4_x": 14, "conv5_x": 7}),
        # ShuffleNet: stem /2, max pool /2, then every stage halves: 28/14/7 at 224 px.
        ("ge_theta_shufflenet_g3", 224, {"stage2": 28, "stage3": 14, "stage4": 7}),
        ("ge_theta_cifar_resnet110", 32, {"stage1": 32, "stage2": 16, "stage3": 8}),
        ("ge_theta_cifar_resnet164", 32, {"stage1": 32, "stage2": 16, "stage3": 8}),
        ("ge_theta_wrn16_8", 32, {"stage1": 32, "stage2": 16, "stage3": 8}),
        # An odd size: 225 -> 113 -> 57 -> 57, 29, 15, 8 (floor((s + 2p - k) / stride) + 1).
        ("ge_theta_resnet50", 225, {"conv2_x": 57, "conv3_x": 29, "conv4_x": 15, "conv5_x": 8}),
    ],
)
def test_global_kernels_follow_input_size(name: str, input_size: int, expected: dict[str, int]) -> None:
    with torch.device("meta"):
        model = create_model(name, input_size=input_size)
    for stage, size in expected.items():
        kernels = {unit.context.gather.conv.kernel_size for _, unit in residual_units(model, stage)}
        assert kernels == {(size, size)}


@pytest.mark.parametrize(
    ("name", "units", "channels"),
    [
        ("resnet50", (3, 4, 6, 3), (64, 256, 512, 1024, 2048)),
        ("shufflenet_g3", (4, 8, 4), (24, 240, 480, 960)),
        ("cifar_resnet20", (3, 3, 3), (16, 16, 32, 64)),
        ("cifar_resnet164", (18, 18, 18), (16, 64, 128, 256)),
        ("wrn16_8", (2, 2, 2), (16, 128, 256, 512)),
    ],
)
def test_feature_info_matches_the_feature_maps(name: str, units: tuple[int, ...], channels: tuple[int, ...]) -> None:
    size = _small_input_size(name)
    model = create_model(name, num_classes=NUM_CLASSES, input_size=size).eval()
    assert [info["num_chs"] for info in model.feature_info] == list(channels)
    assert [len(list(residual_units(model, stage))) for stage in model.stage_names] == list(units)
    maps: dict[str, torch.Tensor] = {}
    for info in model.feature_info:
        module = model.get_submodule(info["module"])
        module.register_forward_hook(lambda _m, _a, out, key=info["module"]: maps.setdefault(key, out.clone()))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
    for info in model.feature_info:
        out = maps[info["module"]]
        assert out.shape[1:] == (info["num_chs"], -(-size // info["reduction"]), -(-size // info["reduction"]))
    assert set(model.stage_names) == {info["stage"] for info in model.feature_info[1:]}
    assert torch.equal(logits, model(x))


# ---------------------------------------------------------------------------------------------
# ResNet layouts and torchvision compatibility


def test_v15_loads_torchvision_resnet50_with_identical_logits() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    model = create_model("resnet50", stride_in_1x1=False).eval()
    result = model.load_state_dict(reference.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize(
    "name", ["se_resnet50", "ge_theta_minus_resnet50", "ge_theta_resnet50", "ge_theta_plus_e8_resnet50"]
)
def test_context_variants_load_torchvision_resnet50_missing_only_context_keys(name: str) -> None:
    state = torchvision.models.resnet50().state_dict()
    model = create_model(name, stride_in_1x1=False)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert all(".context." in key for key in result.missing_keys)
    # BatchNorm fills in a missing num_batches_tracked itself (old checkpoints lack it).
    context_keys = {k for k in model.state_dict() if ".context." in k and not k.endswith("num_batches_tracked")}
    assert set(result.missing_keys) == context_keys
    # GE-θ− has no parameters or buffers; the others have some in each of the 16 units.
    assert (len(context_keys) == 0) == (name == "ge_theta_minus_resnet50")


def test_stride_placement_v1_and_v15() -> None:
    v1 = create_model("resnet50")
    v15 = create_model("resnet50", stride_in_1x1=False)
    for model, conv1_stride, conv2_stride in ((v1, (2, 2), (1, 1)), (v15, (1, 1), (2, 2))):
        first = model.layer2[0]
        assert first.conv1.stride == conv1_stride and first.conv2.stride == conv2_stride
        assert first.downsample[0].stride == (2, 2)
    assert [k for k, _ in v1.state_dict().items()] == [k for k, _ in v15.state_dict().items()]


def test_stages_choose_where_the_context_goes() -> None:
    with torch.device("meta"):
        model = create_model("ge_theta_resnet50", stages=["conv3_x", "conv5_x"])
    for stage in model.stage_names:
        has_context = [not isinstance(u.context, nn.Identity) for _, u in residual_units(model, stage)]
        assert all(has_context) == (stage in ("conv3_x", "conv5_x")) and len(set(has_context)) == 1


def test_zero_init_residual_and_context_init_untouched() -> None:
    class ConstantContext(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 1)
            nn.init.constant_(self.conv.weight, 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = ResNet((1, 1, 1, 1), context_layer=ConstantContext, zero_init_residual=True, input_size=64)
    for _, unit in residual_units(model):
        assert torch.count_nonzero(unit.bn3.weight) == 0
        # The backbone's He init must leave the context module's own init alone.
        assert torch.all(unit.context.conv.weight == 0.5)
    x = torch.randn(1, 64, 16, 16).relu()
    unit = model.layer1[0].eval()
    with torch.no_grad():
        # A zero-initialised branch makes the unit relu(shortcut(x)).
        assert torch.equal(unit(x), torch.relu(unit.downsample(x)))


# ---------------------------------------------------------------------------------------------
# Where the context module sits: after the branch's last BN (or conv), right before the sum


def _zero_context(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


UNITS = {
    "resnet_v1": lambda: ResNet((2, 1, 1, 1), context_layer="ge_theta", input_size=64).layer1,
    "resnet_v15": lambda: ResNet((2, 1, 1, 1), context_layer="se", input_size=64, stride_in_1x1=False).layer1,
    "shufflenet": lambda: ShuffleNet(context_layer="ge_theta_plus_e2", input_size=64).stage3[:2],
    "cifar_resnet": lambda: CifarResNet(20, context_layer="ge_theta_minus_e4").stage2[:2],
    "preact_resnet": lambda: PreActResNet(20, context_layer="ge_theta").stage2[:2],
    "wide_resnet": lambda: WideResNet(16, widen_factor=2, context_layer="se").stage2[:2],
}


@pytest.mark.parametrize("kind", sorted(UNITS))
def test_context_output_is_added_to_the_identity(kind: str) -> None:
    torch.manual_seed(0)
    units = UNITS[kind]().eval()
    first, second = units[0], units[1]  # the first unit changes the shape, the second does not
    chs = first.conv1.in_channels
    x = torch.randn(2, chs, 16, 16).relu()
    seen: dict[str, torch.Tensor] = {}
    first.context.register_forward_hook(lambda _m, _a, out: seen.setdefault("context", out.clone()))
    with torch.no_grad():
        y = first(x)
        # Recompute the unit by hand from the context's output and the unit's shortcut.
        if kind == "shufflenet":
            expected = torch.relu(torch.cat((first.shortcut(x), seen["context"]), 1))
        elif kind.startswith("resnet"):
            expected = torch.relu(seen["context"] + first.downsample(x))
        elif kind == "cifar_resnet":
            expected = torch.relu(seen["context"] + first.shortcut(x))
        else:  # pre-activation: projection of the pre-activated input, no ReLU after the sum
            expected = seen["context"] + first.shortcut(torch.relu(first.bn1(x)))
        torch.testing.assert_close(y, expected)

        # A hook that zeroes the context output removes the branch: the unit is its shortcut.
        z = second(y)
        second.context.register_forward_hook(_zero_context)
        z0 = second(y)
        torch.testing.assert_close(z0, y)  # y is post-ReLU for v1 units, and identity otherwise
        assert not torch.equal(z, z0)


def test_context_input_is_the_last_batchnorm_output() -> None:
    unit = ResNet((1, 1, 1, 1), context_layer="ge_theta_minus", input_size=64).layer1[0].eval()
    seen: dict[str, torch.Tensor] = {}
    unit.bn3.register_forward_hook(lambda _m, _a, out: seen.setdefault("bn3", out.clone()))
    unit.context.register_forward_pre_hook(lambda _m, args: seen.setdefault("context_in", args[0].clone()))
    with torch.no_grad():
        unit(torch.randn(1, 64, 16, 16))
    assert torch.equal(seen["bn3"], seen["context_in"])


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: create_model("ge_theta_resnet50", stages=["conv6_x"]), ValueError, "stages"),
        (lambda: create_model("resnet50", stages="conv2_x"), ValueError, "stages"),
        (lambda: create_model("resnet50", input_size=0), ValueError, "input_size"),
        (lambda: conv_out_size((2, 2), kernel=7), ValueError, "input_size is too small"),
        (lambda: create_model("resnet50", num_classes=-1), ValueError, "num_classes"),  # 0: features only (timm)
        (lambda: create_model("resnet50", in_chans=2.0), TypeError, "in_chans"),
        (lambda: CifarResNet(21), ValueError, "6n\\+2"),
        (lambda: PreActResNet(111), ValueError, "9n\\+2"),
        (lambda: WideResNet(15), ValueError, "6n\\+4"),
        (lambda: ShuffleNet(groups=5), ValueError, "groups"),
        (lambda: ShuffleNet(width=0.3), ValueError, "divisible"),
        (lambda: PreActResNet(164, dropout=1.0), ValueError, "dropout"),
        # A unit's shared options are declared once (UnitOptions); a misspelt one is still the
        # TypeError an explicit keyword-only parameter list gives.
        (lambda: ShuffleUnit(24, 48, stride=2, groups=3, mid_chs=12, context="se"), TypeError, "'context'"),
        # The shared backbone options (BackboneOptions) leave zero_init_residual out of the
        # pre-activation nets, whose branches end with a conv, not a BatchNorm to zero.
        (lambda: PreActResNet(164, zero_init_residual=True), TypeError, "'zero_init_residual'"),
        (lambda: CifarResNet(20, in_chanels=1), TypeError, "'in_chanels'"),
    ],
)
def test_bad_arguments_raise(build, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()
