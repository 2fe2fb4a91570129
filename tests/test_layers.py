"""The Gather-Excite operators against hand-computed values and the paper's definitions."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gather_excite import GatherExcite, SqueezeExcite, create_context, list_context_specs
from gather_excite.layers import (
    ContextSpec,
    ConvGather,
    GlobalConvGather,
    PoolGather,
    context_specs,
    get_context,
    resample_kernel,
)


def selection_window(u: int, extent: int, size: int) -> range:
    """Rows (or columns) of iota(u, e): centre e*u, half-width floor((2e-1)/2), clipped to the map."""
    half = (2 * extent - 1) // 2
    return range(max(0, extent * u - half), min(size, extent * u + half + 1))


def loop_gather(x: torch.Tensor, extent: int, mode: str) -> torch.Tensor:
    """The paper's gather by explicit loops over the selection windows (padding excluded)."""
    n, c, h, w = x.shape
    out_h, out_w = math.ceil(h / extent), math.ceil(w / extent)
    out = torch.empty(n, c, out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            rows, cols = selection_window(i, extent, h), selection_window(j, extent, w)
            window = x[:, :, rows.start : rows.stop, cols.start : cols.stop]
            out[:, :, i, j] = window.mean((2, 3)) if mode == "avg" else window.amax((2, 3))
    return out


# --- hand-computed gates ----------------------------------------------------------------


def test_global_ge_theta_minus_gate_by_hand():
    # channel 0 has mean (1+2+3+6)/4 = 3, channel 1 has mean (-4+0+0+0)/4 = -1
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[-4.0, 0.0], [0.0, 0.0]]]])
    y = GatherExcite(2)(x)
    expected = torch.stack([x[0, 0] / (1 + math.exp(-3.0)), x[0, 1] / (1 + math.exp(1.0))])[None]
    torch.testing.assert_close(y, expected)


def test_se_gate_by_hand():
    # C=2, reduction 2 -> hidden 1. fc1: h = relu(1*m0 + 1*m1 + 0.5); fc2: logits = (2h - 1, -h)
    se = SqueezeExcite(2, reduction=2)
    with torch.no_grad():
        se.mlp.fc1.weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
        se.mlp.fc1.bias.fill_(0.5)
        se.mlp.fc2.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        se.mlp.fc2.bias.copy_(torch.tensor([-1.0, 0.0]))
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]])  # means 2 and 1 -> h = 3.5
    gates = torch.sigmoid(torch.tensor([6.0, -3.5]))
    torch.testing.assert_close(se(x), x * gates.view(1, 2, 1, 1))


# --- the selection operator -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("extent", [2, 4, 8])
@pytest.mark.parametrize("size", [(7, 7), (15, 9), (1, 1), (8, 16), (3, 17)])
def test_pool_gather_equals_selection_operator(mode, extent, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(PoolGather(extent, mode=mode)(x), loop_gather(x, extent, mode))


@pytest.mark.parametrize("extent", [2, 4, 8])
@pytest.mark.parametrize("size", [(7, 7), (15, 9), (1, 1)])
def test_extent_excite_is_nearest_resize_of_the_loop_gather(extent, size):
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    gathered = loop_gather(x, extent, "avg")
    h, w = size
    rows = [i * gathered.shape[2] // h for i in range(h)]  # nearest: floor(i * H' / H)
    cols = [j * gathered.shape[3] // w for j in range(w)]
    gate = torch.sigmoid(gathered[:, :, rows][:, :, :, cols])
    torch.testing.assert_close(GatherExcite(2, extent).double()(x), x * gate)


@pytest.mark.parametrize("extent", [2, 4, 8])
@pytest.mark.parametrize("size", [(7, 7), (15, 9), (1, 1)])
def test_conv_gather_output_is_ceil_of_size_over_extent(extent, size):
    gather = ConvGather(3, extent)
    assert sum(isinstance(m, nn.Conv2d) for m in gather.modules()) == int(math.log2(extent))
    out = gather(torch.randn(2, 3, *size))
    assert out.shape[-2:] == (math.ceil(size[0] / extent), math.ceil(size[1] / extent))


def test_conv_gather_has_relu_between_pairs_but_not_after_last():
    kinds = [type(m).__name__ for m in ConvGather(4, 8).layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]


# --- SE as a special case ---------------------------------------------------------------


def test_gather_excite_mlp_equals_squeeze_excite():
    torch.manual_seed(0)
    ge, se = GatherExcite(32, excite="mlp"), SqueezeExcite(32)
    ge.load_state_dict(se.state_dict())  # same parameter names: mlp.fc1/fc2
    x = torch.randn(3, 32, 5, 6)
    torch.testing.assert_close(ge(x), se(x))
    assert isinstance(create_context("se", 32), SqueezeExcite)


# --- parameter counts -------------------------------------------------------------------


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("channels", [64, 256])
def test_parameter_counts_match_formulas(channels):
    c, k, hidden = channels, 3, channels // 16
    mlp = c * hidden + hidden + hidden * c + c  # two 1x1 convs with bias
    bn = 2 * c
    assert n_params(create_context("ge_theta_minus", c)) == 0
    assert n_params(create_context("ge_theta_minus_e8", c)) == 0
    assert n_params(create_context("se", c)) == mlp
    for extent in (2, 4, 8):
        convs = int(math.log2(extent))
        assert n_params(create_context(f"ge_theta_e{extent}", c)) == convs * (c * k * k + bn)
        assert n_params(create_context(f"ge_theta_plus_e{extent}", c)) == convs * (c * k * k + bn) + mlp
    # global: one depthwise conv with a kernel as large as the feature map (reference.md: 56x56 at conv2_x)
    assert n_params(create_context("ge_theta", c, feature_size=56)) == c * 56 * 56 + bn
    assert n_params(create_context("ge_theta_plus", c, feature_size=(7, 5))) == c * 35 + bn + mlp


def test_reference_global_depthwise_count_conv2_x():
    # reference.md: 256*56*56*3 = 2.41M depthwise weights for the three conv2_x units
    per_unit = create_context("ge_theta", 256, feature_size=56).gather.conv.weight.numel()
    assert 3 * per_unit == 2_408_448


# --- shapes and gradients everywhere ----------------------------------------------------


@pytest.mark.parametrize("spec", list_context_specs())
@pytest.mark.parametrize("size", [(7, 7), (15, 9), (1, 1), (16, 16)])
def test_every_spec_keeps_shape_and_reaches_every_parameter(spec, size):
    module = create_context(spec, 16, feature_size=size)
    x = torch.randn(2, 16, *size, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize(
    "spec",
    [
        "ge_theta_minus",
        "ge_theta_minus_e2",
        "ge_theta_minus_max_e4",
        "ge_theta_e4",
        "ge_theta",
        "ge_theta_plus",
        "ge_theta_plus_e2",
        "se",
    ],
)
def test_gradcheck_float64(spec):
    torch.manual_seed(0)
    module = create_context(spec, 4, feature_size=(5, 3)).double().eval()  # eval: BN is a fixed affine map
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]
    weights = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(inp, *values):
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *weights), eps=1e-6, atol=1e-5)


# --- the global kernel at other resolutions ---------------------------------------------


def test_resampled_kernel_is_unchanged_at_training_size():
    gather = GlobalConvGather(3, (6, 4))
    assert gather.kernel_for((6, 4)) is gather.conv.weight
    x = torch.randn(2, 3, 6, 4)
    torch.testing.assert_close(gather(x), gather.bn(F.conv2d(x, gather.conv.weight, groups=3)))


@pytest.mark.parametrize("size", [(14, 14), (3, 3), (9, 5), (1, 1)])
def test_resampled_kernel_keeps_the_gate_of_a_constant_map(size):
    torch.manual_seed(0)
    module = GatherExcite(3, gather="conv", feature_size=7).eval()
    with torch.no_grad():
        module.gather.bn.running_mean.uniform_(-1, 1)
        module.gather.bn.running_var.uniform_(0.5, 2)
    gates = []
    hook = module.gate.register_forward_hook(lambda _m, _i, out: gates.append(out))
    constant = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    module(constant.expand(1, 3, 7, 7))
    module(constant.expand(1, 3, *size))
    hook.remove()
    torch.testing.assert_close(gates[1], gates[0])
    kernel = module.gather.kernel_for(size)
    assert kernel.shape == (3, 1, *size)
    torch.testing.assert_close(kernel.sum((1, 2, 3)), module.gather.conv.weight.sum((1, 2, 3)))


def test_resample_kernel_of_a_constant_kernel_is_constant():
    weight = torch.full((2, 1, 4, 4), 0.25)
    out = resample_kernel(weight, (8, 2))
    torch.testing.assert_close(out, torch.full((2, 1, 8, 2), 4.0 / 16))


def test_strict_size_names_both_sizes():
    module = GatherExcite(3, gather="conv", feature_size=(7, 7), strict_size=True)
    with pytest.raises(ValueError, match=r"9x9.*7x7"):
        module(torch.randn(1, 3, 9, 9))


# --- the gate is readable and steerable -------------------------------------------------


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta_e4", "ge_theta_plus", "se"])
def test_gate_hook_reads_without_changing_output_and_can_zero_channels(spec):
    torch.manual_seed(0)
    module = create_context(spec, 8, feature_size=6).eval()
    x = torch.randn(2, 8, 6, 6)
    plain = module(x)
    seen = []
    handle = module.gate.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    torch.testing.assert_close(module(x), plain)
    assert seen[0].shape[:2] == (2, 8) and ((seen[0] >= 0) & (seen[0] <= 1)).all()
    handle.remove()

    def zero_channel_3(_m, _i, gate):
        gate = gate.clone()
        gate[:, 3] = 0
        return gate

    handle = module.gate.register_forward_hook(zero_channel_3)
    steered = module(x)
    handle.remove()
    assert (steered[:, 3] == 0).all()
    keep = [c for c in range(8) if c != 3]
    torch.testing.assert_close(steered[:, keep], plain[:, keep])


# --- dtypes, memory formats, compile ----------------------------------------------------


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta_e2", "ge_theta_plus", "se"])
def test_float64_and_channels_last_agree_with_float32(spec):
    torch.manual_seed(0)
    module = create_context(spec, 8, feature_size=9)
    x = torch.randn(2, 8, 9, 9)
    ref = module(x)
    torch.testing.assert_close(module(x.to(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.double()(x.double()).float(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta", "ge_theta_plus_e4", "se"])
def test_bf16_autocast_gate_is_finite_for_large_inputs(spec):
    module = create_context(spec, 8, feature_size=9)
    x = torch.randn(2, 8, 9, 9) * 1e4  # logits far outside the sigmoid's linear range
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert torch.isfinite(y).all()
    assert y.shape == x.shape


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    module = create_context("ge_theta_plus_e2", 8)
    x = torch.randn(2, 8, 10, 10)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))


# --- errors name the argument -----------------------------------------------------------


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="4D tensor"):
        GatherExcite(3)(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="channels=3"):
        GatherExcite(3)(torch.randn(1, 4, 5, 5))
    for bad in (3, 1, 0, 6, -2):
        with pytest.raises(ValueError, match="extent"):
            GatherExcite(3, bad)
    with pytest.raises(TypeError, match="extent"):
        GatherExcite(3, 2.0)
    with pytest.raises(ValueError, match="feature_size"):
        GatherExcite(3, gather="conv")
    with pytest.raises(ValueError, match="gather"):
        GatherExcite(3, gather="median")
    with pytest.raises(ValueError, match="excite"):
        GatherExcite(3, excite="softmax")
    with pytest.raises(ValueError, match=r"ge_thta.*Did you mean 'ge_theta'.*Known specs: .*se"):
        get_context("ge_thta")
    with pytest.raises(TypeError, match="channels"):
        GatherExcite("3")
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor"):
        GatherExcite(3)([1, 2, 3])


def test_create_context_accepts_class_partial_and_none():
    assert isinstance(create_context(None, 8), nn.Identity)
    assert isinstance(create_context(SqueezeExcite, 8), SqueezeExcite)
    built = create_context(functools.partial(GatherExcite, gather="conv"), 8, feature_size=5)
    assert isinstance(built.gather, GlobalConvGather) and built.gather.feature_size == (5, 5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    module = create_context("ge_theta_e4", 8)
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(torch.compile(module)(x), module(x), rtol=1e-4, atol=1e-5)


# --- the vocabulary: ContextSpec ----------------------------------------------------------

# The README's table of variants, written out by hand: spec variant -> (gather, excite).
README_TABLE = {
    "ge_theta_minus": ("avg", "plain"),
    "ge_theta_minus_max": ("max", "plain"),
    "ge_theta": ("conv", "plain"),
    "ge_theta_plus": ("conv", "mlp"),
}


def test_context_specs_are_every_variant_at_every_extent():
    # SE (global only) + 4 GE variants x (global, E2, E4, E8) = 1 + 16 = 17 spec strings.
    names = [spec.name for spec in context_specs()]
    assert len(names) == len(set(names)) == 17
    assert sorted(names) == list_context_specs()
    assert all(ContextSpec.parse(name).name == name for name in names)


@pytest.mark.parametrize(
    ("name", "variant", "extent", "paper_label"),
    [
        ("se", "se", None, "SE"),
        ("ge_theta_minus", "ge_theta_minus", None, "GE-θ− (global)"),
        ("ge_theta_minus_max_e4", "ge_theta_minus_max", 4, "GE-θ− (max) (E4)"),
        ("ge_theta_e8", "ge_theta", 8, "GE-θ (E8)"),
        ("ge_theta_plus_e2", "ge_theta_plus", 2, "GE-θ+ (E2)"),
    ],
)
def test_context_spec_parse_known_answers(name, variant, extent, paper_label):
    spec = ContextSpec.parse(name)
    assert (spec.variant, spec.extent, spec.paper_label) == (variant, extent, paper_label)
    assert spec == ContextSpec(variant, extent)  # frozen dataclass: equal by value


@pytest.mark.parametrize("bad", ["se_e2", "ge_theta_e3", "ge_theta_e08", "ge_theta_e16", "ge_thta", "ge_theta_", ""])
def test_context_spec_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="unknown context spec"):
        ContextSpec.parse(bad)
    with pytest.raises(TypeError, match="str"):
        ContextSpec.parse(8)


@pytest.mark.parametrize("spec", [s for s in context_specs() if s.variant != "se"], ids=lambda s: s.name)
def test_context_spec_build_matches_the_readme_table(spec):
    # Two formulations: the spec's constructor and GatherExcite with the README's arguments.
    gather, excite = README_TABLE[spec.variant]
    torch.manual_seed(0)
    built = spec.build(8, feature_size=6)
    torch.manual_seed(0)
    direct = GatherExcite(8, spec.extent, gather=gather, excite=excite, feature_size=6)
    assert (built.extent, built.gather_mode, built.excite_mode) == (spec.extent, gather, excite)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(built(x), direct(x), rtol=0, atol=0)
    assert isinstance(ContextSpec("se").build(8), SqueezeExcite)


def test_context_spec_timm_arguments():
    # timm.layers.GatherExcite: extra_params=True is the conv gather, use_mlp the MLP excite, extent 0 global.
    assert ContextSpec.parse("ge_theta_e4").timm_kwargs == {"extra_params": True, "use_mlp": False, "extent": 4}
    assert ContextSpec.parse("se").timm_kwargs == {"extra_params": False, "use_mlp": True, "extent": 0}
    assert ContextSpec.parse("ge_theta_minus_max").timm_kwargs is None  # timm has no max-pool gather


def test_initialisation_is_the_authors_release() -> None:
    """RN50-GEPP.prototxt: excite convs Gaussian std 0.01 with zero biases; gather convs Caffe's
    ``msra`` filler, std sqrt(2 / fan_in) with fan_in the depthwise kernel's area (9 for 3x3, 56 * 56)."""
    torch.manual_seed(0)
    plus = GatherExcite(1024, 4, gather="conv", excite="mlp")
    glob = GatherExcite(256, gather="conv", excite="mlp", feature_size=56)
    for fc in (plus.mlp.fc1, plus.mlp.fc2, glob.mlp.fc1, glob.mlp.fc2, SqueezeExcite(1024).mlp.fc2):
        assert abs(fc.weight.std().item() - 0.01) < 0.001 and not fc.bias.any()
    conv = plus.gather.layers[0].weight  # 1024 x 1 x 3 x 3
    assert abs(conv.std().item() - (2 / 9) ** 0.5) < 0.02 * (2 / 9) ** 0.5
    assert abs(glob.gather.conv.weight.std().item() - (2 / 56**2) ** 0.5) < 0.01 * (2 / 56**2) ** 0.5
    # Every gate then starts near 0.5 (sigmoid(0) plus what weights of std 0.01 add), also for a
    # 1-unit hidden layer (16 channels / 16), whose bias PyTorch's default drew from U(-1, 1).
    x = torch.randn(8, 16, 8, 8)
    gate = torch.sigmoid(SqueezeExcite(16).eval().mlp(x.mean((2, 3), keepdim=True)))
    assert (gate - 0.5).abs().max() < 0.01
