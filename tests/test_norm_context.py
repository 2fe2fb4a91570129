"""The memory-lean ``NormContext`` equals the plain ``context(bn(x))`` and keeps less for backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import forward_ad

from gather_excite.layers import _reduce, create_context, list_context_specs
from gather_excite.layers._broadcast import GateBroadcast
from gather_excite.layers._hooks import has_hooks
from gather_excite.layers._reduce import batch_stats, map_dot, map_weighted_sum
from gather_excite.layers.norm_context import BatchNorm2d, NormContext, lean_enabled, set_lean


@pytest.fixture(autouse=True)
def _restore_lean():
    previous = lean_enabled()
    yield
    set_lean(previous)


def norm_context(bn: nn.Module, context: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``context(bn(z))`` through a NormContext built now (so under the current global switch)."""
    return NormContext()(z, bn, context)


def _unit(spec: str, channels: int, size: int, *, dtype=torch.float64, seed: int = 0, **bn_kwargs):
    torch.manual_seed(seed)
    bn = BatchNorm2d(channels, **bn_kwargs).to(dtype)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    if bn.running_mean is not None:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    context = create_context(spec, channels, feature_size=size).to(dtype)
    for p in context.parameters():  # nonzero everywhere, so every gradient path carries signal
        nn.init.normal_(p, std=0.3)
    return bn, context


def _lean_ran(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ in ("LeanGlobalBackward", "LeanWindowedBackward")


def _run(bn, context, z, *, lean: bool, grad_seed: int = 1):
    set_lean(lean)
    z = z.detach().clone().requires_grad_()
    out = norm_context(bn, context, z)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    out.backward(grad.to(memory_format=torch.channels_last) if z.is_contiguous(memory_format=torch.channels_last)
                 and not z.is_contiguous() else grad)  # fmt: skip
    params = {n: p.grad for n, p in [*bn.named_parameters(), *context.named_parameters()]}
    buffers = {n: b.clone() for n, b in [*bn.named_buffers(), *context.named_buffers()]}
    return out, z.grad, params, buffers


def _assert_lean_equals_plain(spec, *, size, training, dtype=torch.float64, atol=1e-10, rtol=1e-10, channels_last=False,
             steps=1, **bn_kwargs):  # fmt: skip
    """Run the plain and the lean unit side by side for ``steps`` steps; every tensor must agree."""
    bn, context = _unit(spec, 8, size, dtype=dtype, **bn_kwargs)
    bn.train(training)
    context.train(training)
    bn2, context2 = copy.deepcopy(bn), copy.deepcopy(context)
    for step in range(steps):
        z = torch.randn(3, 8, size, size, dtype=dtype, generator=torch.Generator().manual_seed(step)) * 2 + 0.5
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        plain = _run(bn, context, z, lean=False, grad_seed=step)
        lean = _run(bn2, context2, z, lean=True, grad_seed=step)
        assert _lean_ran(lean[0])
        torch.testing.assert_close(lean[0], plain[0], atol=atol, rtol=rtol)
        torch.testing.assert_close(lean[1], plain[1], atol=atol, rtol=rtol)
        for group in (2, 3):
            assert lean[group].keys() == plain[group].keys()
            for name in plain[group]:
                torch.testing.assert_close(lean[group][name], plain[group][name], atol=atol, rtol=rtol, msg=name)
    return plain, lean


# 12 px: extents 2 and 4 repeat each gate cell as a 2x2 / 4x4 block (the broadcast path), extent 8
# gives a 2x2 gate that covers 6x6 blocks (not a power of two: the run-length path); 7 px: no
# extent divides the map.
@pytest.mark.parametrize("spec", list_context_specs())
@pytest.mark.parametrize("size", [12, 7])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_lean_equals_plain_float64(spec, size, training):
    """Output, input/parameter gradients and every buffer equal the plain composition's (float64)."""
    plain, lean = _assert_lean_equals_plain(spec, size=size, training=training)
    assert _lean_ran(lean[0]) and not _lean_ran(plain[0])


@pytest.mark.parametrize("spec", ["ge_theta_minus_e2", "ge_theta_minus_max_e4", "ge_theta_e8", "ge_theta_plus_e4"])
@pytest.mark.parametrize("size", [12, 7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_windowed_gate_gradient_one_sample_at_a_time_equals_plain(spec, size, channels_last, monkeypatch):
    """The windowed gate's gradient is summed one sample at a time on the CPU (a 1-element chunk
    budget); the result equals the plain composition's for every broadcast path (12 px: blocks of
    2 and 4, 6x6 runs; 7 px: runs of unequal length), NCHW and channels-last."""
    monkeypatch.setattr(_reduce, "_CHUNK_ELEMENTS", 1)
    _assert_lean_equals_plain(spec, size=size, training=True, channels_last=channels_last)


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta_plus_e2", "se"])
def test_running_stats_cumulative_average_and_batch_count(spec):
    """momentum=None (cumulative average) over 3 steps: running stats and num_batches_tracked match."""
    _plain, lean = _assert_lean_equals_plain(spec, size=8, training=True, steps=3, momentum=None)
    assert lean[3]["num_batches_tracked"].item() == 3  # one per step, as nn.BatchNorm2d counts


def test_no_running_stats():
    """track_running_stats=False: batch statistics in train and eval mode, as nn.BatchNorm2d does."""
    for spec in ("ge_theta_e2", "se"):
        for training in (True, False):
            _plain, lean = _assert_lean_equals_plain(spec, size=8, training=training, track_running_stats=False)
            assert "running_mean" not in lean[3]  # no buffers to update, in either mode


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta_minus_e2", "ge_theta_e4", "ge_theta_plus", "se"])
@pytest.mark.parametrize("size", [8, 7])
def test_channels_last_equals_plain(spec, size):
    """channels_last input: same values as the plain composition (float64), and a channels-last
    input gradient as the plain composition gives."""
    plain, lean = _assert_lean_equals_plain(spec, size=size, training=True, channels_last=True)
    for output in (0, 1):  # the unit's output and the input gradient: in the plain composition's layout
        assert lean[output].stride() == plain[output].stride()


@pytest.mark.parametrize("spec", ["ge_theta_minus_e2", "ge_theta_e4", "ge_theta_plus_e2"])
@pytest.mark.parametrize(("input_last", "grad_last"), [(True, False), (False, True)])
def test_mixed_layouts_equal_plain(spec, input_last, grad_last):
    """An input in one layout and the output's gradient in the other (the gate's block views then
    meet a strided map): values and gradients equal the plain composition's at float64."""
    bn, context = _unit(spec, 8, 8)
    layout = {True: torch.channels_last, False: torch.contiguous_format}
    z = (torch.randn(3, 8, 8, 8, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=layout[input_last])
    grad = torch.randn(3, 8, 8, 8, dtype=torch.float64).contiguous(memory_format=layout[grad_last])
    results = []
    for lean in (False, True):
        set_lean(lean)
        bn_copy, context_copy = copy.deepcopy(bn), copy.deepcopy(context)
        leaf = z.clone().requires_grad_()
        out = norm_context(bn_copy, context_copy, leaf)
        assert _lean_ran(out) == lean
        out.backward(grad)
        results.append([out, leaf.grad, *(p.grad for p in [*bn_copy.parameters(), *context_copy.parameters()])])
    for plain, lean in zip(*results, strict=True):
        torch.testing.assert_close(lean, plain, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta_minus_e4", "ge_theta_plus_e2", "ge_theta", "se"])
def test_bf16_autocast_close_to_plain(spec):
    """Under bf16 autocast the output dtype matches, and the lean path is as close to a float32
    run as the plain path is: both round to bf16, in a different order."""
    bn, context = _unit(spec, 16, 8, dtype=torch.float32)
    z = torch.randn(4, 16, 8, 8)
    results, dtypes = {}, {}
    for name, lean, autocast in (("fp32", False, False), ("plain", False, True), ("lean", True, True)):
        set_lean(lean)
        b, c = copy.deepcopy(bn), copy.deepcopy(context)
        x = z.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm_context(b, c, x.to(torch.bfloat16) if autocast else x)
        out.float().square().sum().backward()
        dtypes[name] = out.dtype
        results[name] = [out.float(), x.grad, b.weight.grad, b.bias.grad, *(p.grad for p in c.parameters())]
    assert dtypes["lean"] == dtypes["plain"] == torch.bfloat16
    for ref, plain, lean in zip(results["fp32"], results["plain"], results["lean"], strict=True):
        plain_error, lean_error = (plain - ref).norm() / ref.norm(), (lean - ref).norm() / ref.norm()
        assert lean_error <= 2 * plain_error + 1e-2, (float(lean_error), float(plain_error))


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta_minus_e2", "ge_theta_minus_max_e2", "ge_theta_e2",
                                  "ge_theta_plus", "se"])  # fmt: skip
def test_gradcheck(spec):
    """Finite differences agree with the lean backward (float64, train-mode BN)."""
    set_lean(True)
    bn, context = _unit(spec, 3, 4)
    params = [bn.weight, bn.bias, *context.parameters()]
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *_):
        return norm_context(bn, context, x)

    assert torch.autograd.gradcheck(fn, (z, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def _saved_storages(fn) -> dict[int, int]:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


@pytest.mark.parametrize(
    "spec", ["ge_theta_minus", "ge_theta_minus_e2", "ge_theta_minus_max_e4", "ge_theta", "ge_theta_e2",
             "ge_theta_e8", "ge_theta_plus_e2", "ge_theta_plus_e4", "se"],
)  # fmt: skip
def test_lean_keeps_only_the_batchnorm_input_full_size(spec):
    """Plain keeps z and BN(z) (and a resized gate) at full size, and the gather's maps at a quarter
    size and less; lean keeps z and, besides parameters, only per-(sample, channel) values."""
    bn, context = _unit(spec, 16, 16, dtype=torch.float32)
    z = torch.randn(4, 16, 16, 16, requires_grad=True)
    full, per_sample_channel = z.numel() * 4, 4 * 16 * 4
    parameters = {p.untyped_storage().data_ptr() for p in [*bn.parameters(), *context.parameters()]}
    set_lean(False)
    storages = _saved_storages(lambda: norm_context(bn, context, z))
    assert sum(n >= full for n in storages.values()) == (2 if spec in ("ge_theta_minus", "ge_theta", "se") else 3)
    set_lean(True)
    storages = _saved_storages(lambda: norm_context(bn, context, z))
    assert z.untyped_storage().data_ptr() in storages
    others = [n for ptr, n in storages.items() if ptr not in parameters and ptr != z.untyped_storage().data_ptr()]
    assert max(others) <= per_sample_channel, sorted(others)


def test_gate_hook_reads_and_steers_on_the_lean_path():
    """A GateProbe hook that zeroes channel 2 zeroes that channel of the output, lean or plain."""
    bn, context = _unit("ge_theta_minus_e2", 8, 8)

    def zero_channel(module, inputs, output):
        output = output.clone()
        output[:, 2] = 0
        return output

    context.gate.register_forward_hook(zero_channel)
    _plain, lean = _compare_with(bn, context)
    assert torch.count_nonzero(lean[0][:, 2]) == 0


def _compare_with(bn, context):
    bn2, context2 = copy.deepcopy(bn), copy.deepcopy(context)
    z = torch.randn(3, 8, 8, 8, dtype=torch.float64)
    plain, lean = _run(bn, context, z, lean=False), _run(bn2, context2, z, lean=True)
    assert _lean_ran(lean[0])
    for group in (0, 1):
        torch.testing.assert_close(lean[group], plain[group], atol=1e-10, rtol=1e-10)
    for name in plain[2]:
        torch.testing.assert_close(lean[2][name], plain[2][name], atol=1e-10, rtol=1e-10)
    return plain, lean


def test_hooks_on_the_context_parts_run_on_the_lean_path_and_everywhere_when_built_plain():
    """The lean path calls the gather (a windowed one whole, once more in backward) and the gate probe
    as modules, so their hooks fire on it; a NormContext built with lean=False runs every hook once."""
    set_lean(True)
    bn, context = _unit("ge_theta_e2", 8, 8)
    calls = []
    for name, module in (("gather", context.gather), ("first", context.gather.layers[0]), ("gate", context.gate)):
        module.register_forward_hook(lambda *_args, name=name: calls.append(name))
    z = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    out = NormContext(lean=True)(z, bn, context)
    assert _lean_ran(out)
    assert sorted(calls) == ["first", "gate", "gather"]
    calls.clear()
    out.sum().backward()  # backward records the gather again (the windowed gate is not kept), as checkpointing does
    assert sorted(calls) == ["first", "gate", "gather"]
    calls.clear()
    assert not _lean_ran(NormContext(lean=False)(z, bn, context))
    assert sorted(calls) == ["first", "gate", "gather"]


HOOKS = {  # registration -> the calls one forward + backward makes to it as a module (hook name, count)
    "forward_pre": lambda m, log: m.register_forward_pre_hook(lambda *_: log.append("forward_pre")),
    "forward": lambda m, log: m.register_forward_hook(lambda *_: log.append("forward")),
    "forward_kwargs": lambda m, log: m.register_forward_hook(lambda *_: log.append("forward_kwargs"), with_kwargs=True),
    "full_backward_pre": lambda m, log: m.register_full_backward_pre_hook(lambda *_: log.append("full_backward_pre")),
    "full_backward": lambda m, log: m.register_full_backward_hook(lambda *_: log.append("full_backward")),
}


@pytest.mark.parametrize("where", ["bn", "context"])
@pytest.mark.parametrize("kind", sorted(HOOKS))
@pytest.mark.parametrize("spec", ["ge_theta_e2", "se"])
def test_a_hook_on_the_norm_or_the_context_module_takes_the_plain_path_while_registered(where, kind, spec):
    """The lean path does not call the norm or the context module, so while a hook is registered on
    either the unit runs the plain composition: the hook fires once per forward (backward hooks once
    per backward), the results equal a plain unit's; removed, the unit is lean again."""
    set_lean(True)
    bn, context = _unit(spec, 8, 8)
    plain_bn, plain_context = copy.deepcopy(bn), copy.deepcopy(context)
    log = []
    handle = HOOKS[kind]({"bn": bn, "context": context}[where], log)
    z = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    hooked, expected = _run(bn, context, z, lean=True), _run(plain_bn, plain_context, z, lean=False)
    assert not _lean_ran(hooked[0])
    assert log == [kind]  # one forward, one backward: the hook ran exactly once, as on a plain unit
    for group in (0, 1):
        torch.testing.assert_close(hooked[group], expected[group], atol=0, rtol=0)
    handle.remove()
    assert _lean_ran(_run(bn, context, z, lean=True)[0])
    assert log == [kind]


def test_hook_state_follows_the_handle_and_copies():
    """``with handle:`` and ``remove()`` are seen at once; a deep copy carries its own registered hook
    (removing the original's leaves the copy's); a norm that cannot report its hooks is plain."""
    set_lean(True)
    bn, context = _unit("ge_theta_minus_e4", 8, 8)
    z = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    with bn.register_forward_hook(lambda *_: None) as handle:
        assert not _lean_ran(norm_context(bn, context, z))
        copied = copy.deepcopy(bn)
    assert _lean_ran(norm_context(bn, context, z))
    assert not _lean_ran(norm_context(copied, context, z))  # the copy's hook is still registered
    handle.remove()  # a second remove changes nothing
    assert has_hooks(copied) is True and has_hooks(bn) is False
    plain_bn = nn.BatchNorm2d(8).double()
    plain_bn.load_state_dict(bn.state_dict())  # the same keys and buffers
    assert has_hooks(plain_bn) is None
    assert not _lean_ran(norm_context(plain_bn, context, z))
    assert repr(plain_bn) == repr(bn) and isinstance(bn, nn.BatchNorm2d)


@pytest.mark.parametrize("case", ["no_grad", "identity", "sync_bn", "disabled"])
def test_plain_path_cases(case):
    """No grad, a non-GE context, a norm layer other than BatchNorm2d, or set_lean(False): plain."""
    set_lean(case != "disabled")
    bn, context = _unit("se", 8, 8)
    if case == "identity":
        context = nn.Identity()
    if case == "sync_bn":
        bn = nn.SyncBatchNorm(8).double()  # on CPU without a process group it works as BatchNorm in eval
        bn.eval()
    z = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    if case == "no_grad":
        with torch.no_grad():
            out = norm_context(bn, context, z)
        assert out.grad_fn is None
    else:
        out = norm_context(bn, context, z)
        assert not _lean_ran(out)
    torch.testing.assert_close(out, context(bn(z)))


def test_wrong_channels_raises_like_plain():
    """A map with the wrong channel count raises the context module's ValueError on the lean path too."""
    set_lean(True)
    _bn, context = _unit("ge_theta_minus", 8, 8)
    bn6 = BatchNorm2d(6).double()
    with pytest.raises(ValueError, match="channels=8"):
        norm_context(bn6, context, torch.randn(2, 6, 8, 8, dtype=torch.float64, requires_grad=True))


def test_set_lean_and_norm_context_reject_non_bool():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_lean(1)
    with pytest.raises(TypeError, match="lean must be a bool or None"):
        NormContext(lean="yes")


@pytest.mark.parametrize(
    ("small", "big"), [((4, 4), (7, 7)), ((2, 3), (14, 9)), ((28, 28), (56, 56)), ((3, 1), (12, 5))]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_nearest_resize_equals_interpolate(small, big, channels_last):
    """The run-length / block broadcasts reproduce F.interpolate(mode="nearest") exactly."""
    gate = torch.rand(2, 3, *small)
    x = torch.randn(2, 3, *big)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(gate, size=big, mode="nearest")
    broadcast = GateBroadcast(gate, x)
    product = broadcast.multiply(x)
    assert torch.equal(product, x * expected) and product.stride() == x.stride()
    # The gate's gradient: autograd through interpolate gives the same sums (in another order).
    grad_out = torch.randn_like(x)
    leaf = gate.clone().requires_grad_()
    (x * F.interpolate(leaf, size=big, mode="nearest")).backward(grad_out)
    torch.testing.assert_close(broadcast.gate_grad(grad_out, x), leaf.grad)


def _assert_map_dot_and_weighted_sum_equal_the_conv(channels_last: bool) -> torch.Tensor:
    """map_dot equals a depthwise conv as large as the map (F.conv2d, groups=C) and map_weighted_sum
    its kernel gradient, on a float64 map in the given layout; returns the map."""
    torch.manual_seed(0)
    x = torch.randn(5, 6, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(6, 1, 7, 9, dtype=torch.float64, requires_grad=True)
    conv = F.conv2d(x, kernel, groups=6)
    torch.testing.assert_close(map_dot(x, kernel[:, 0].detach(), torch.float64), conv.view(5, 6))
    weight = torch.randn(5, 6, dtype=torch.float64)
    (grad_kernel,) = torch.autograd.grad(conv, kernel, weight.view(5, 6, 1, 1))
    torch.testing.assert_close(map_weighted_sum(weight, x, torch.float64), grad_kernel[:, 0])
    return x


@pytest.mark.parametrize("chunk", [1, 300, 2**18])
@pytest.mark.parametrize("channels_last", [False, True])
def test_map_dot_and_weighted_sum_equal_the_depthwise_conv(chunk, channels_last, monkeypatch):
    """The global gather's per-sample loops equal a depthwise conv as large as the map and its
    weight gradient (F.conv2d, groups=C), in either layout and for any chunk of samples."""
    monkeypatch.setattr(_reduce, "_CHUNK_ELEMENTS", chunk)
    x = _assert_map_dot_and_weighted_sum_equal_the_conv(channels_last)
    other = torch.randn(5, 6, 7, 9, dtype=torch.float64)  # a map of its own per sample
    torch.testing.assert_close(map_dot(x, other, torch.float64), (x * other).sum((2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_stats_equal_batchnorm_and_stay_stable_far_from_zero(channels_last, monkeypatch):
    """Mean, biased variance and running averages equal torch.batch_norm_update_stats's; a map
    with mean 1000 and std 0.01 keeps its variance (1e-4) to 1e-3 relative, as PyTorch's own
    Welford pass does (3e-4 here); a one-pass E[z^2] - E[z]^2 in float32 would lose it
    entirely (1e6 * 2^-24 = 0.06 >> 1e-4)."""
    monkeypatch.setattr(_reduce, "_CHUNK_ELEMENTS", 200)  # several chunks
    torch.manual_seed(0)
    z = torch.randn(6, 4, 5, 7) * torch.tensor([0.01, 1.0, 3.0, 0.5]).view(1, 4, 1, 1)
    z = z + torch.tensor([1000.0, -2.0, 0.0, 7.0]).view(1, 4, 1, 1)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    mean, var, sample_mean = batch_stats(z, rm, rv, 0.3, torch.float32)
    z64 = z.double()
    torch.testing.assert_close(mean, z64.mean((0, 2, 3)).float())
    torch.testing.assert_close(var, z64.var((0, 2, 3), correction=0).float(), rtol=1e-3, atol=0)
    ref_mean, ref_var = torch.batch_norm_update_stats(z, rm2, rv2, 0.3)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2, rtol=1e-4, atol=1e-6)
    if sample_mean is not None:
        torch.testing.assert_close(sample_mean, z64.mean((2, 3)).float())


def test_double_backward_raises_instead_of_being_wrong():
    """The lean backward is first-order only: create_graph=True then a second backward raises."""
    set_lean(True)
    bn, context = _unit("ge_theta_minus_e2", 8, 8)
    z = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(norm_context(bn, context, z).square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|twice|double"):
        grad.sum().backward()


def test_sync_batchnorm_conversion_takes_the_plain_path_with_the_same_output():
    """`trainer.sync_batchnorm` converts every BN to SyncBatchNorm; NormContext must then fall back to
    the plain composition (the lean path handles plain BatchNorm2d only) and give the same logits."""
    from gather_excite import create_model

    torch.manual_seed(0)
    model = create_model("ge_theta_plus_cifar_resnet20", num_classes=5, width=4).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = model(x)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()  # eval: no process group needed
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    torch.testing.assert_close(synced(x), expected)


# --- edges of issue 10 ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["ge_theta_e2", "ge_theta_plus_e4", "ge_theta", "ge_theta_plus", "se"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_gives_the_empty_result_of_the_plain_composition(spec, training):
    """N=0 with gradients on: the (0, C, H, W) output and gradients of context(bn(z)), no error
    (the lean path used to index the first sample of the batch)."""
    bn, context = _unit(spec, 8, 8)
    bn.train(training)
    context.train(training)
    bn2, context2 = copy.deepcopy(bn), copy.deepcopy(context)
    z = torch.randn(0, 8, 8, 8, dtype=torch.float64)
    plain, lean = _run(bn, context, z, lean=False), _run(bn2, context2, z, lean=True)
    assert lean[0].shape == plain[0].shape == (0, 8, 8, 8)
    assert lean[1].shape == (0, 8, 8, 8)
    for name, grad in plain[2].items():  # an empty batch contributes nothing: zero or no gradient
        assert (grad is None) == (lean[2][name] is None), name
        if grad is not None:
            torch.testing.assert_close(lean[2][name], grad, msg=name, equal_nan=True)


def test_forward_mode_ad_through_a_ge_network_equals_finite_differences():
    """torch.autograd.forward_ad through a training-mode GE-θ+ network (parameters requiring grad, so
    the lean path would be eligible): the tangent equals the plain composition's and a central
    finite difference of the output (float64)."""
    from gather_excite import create_model

    torch.manual_seed(0)
    model = create_model("ge_theta_plus_cifar_resnet20", num_classes=5, width=4).double().train()
    # The MLPs start with zero biases and weights of std 0.01 (the authors'), so their hidden units sit
    # at the ReLU's kink, where a finite difference is no derivative: move them off it.
    for name, parameter in model.named_parameters():
        if name.endswith("mlp.fc1.bias"):
            torch.nn.init.constant_(parameter, 0.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tangent = torch.randn_like(x)
    tangents = {}
    for lean in (False, True):
        set_lean(lean)
        m = copy.deepcopy(model)
        with forward_ad.dual_level():
            out = m(forward_ad.make_dual(x, tangent))
            tangents[lean] = forward_ad.unpack_dual(out).tangent
    eps = 1e-6
    with torch.no_grad():
        difference = (copy.deepcopy(model)(x + eps * tangent) - copy.deepcopy(model)(x - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(tangents[True], tangents[False], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(tangents[True], difference, atol=1e-5, rtol=1e-5)


# --- the device-generic branches (issue 11), run on the CPU ---------------------------------------


@pytest.fixture
def device_generic(monkeypatch):
    """Take the branches that every non-CPU device takes (einsum, multiply-and-sum,
    batch_norm_update_stats) instead of the CPU loops."""
    monkeypatch.setattr(_reduce, "CPU_KERNELS", False)


@pytest.mark.parametrize("spec", ["ge_theta_minus", "ge_theta_minus_e2", "ge_theta_e4", "ge_theta", "ge_theta_plus",
                                  "se"])  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_device_generic_branches_equal_plain(device_generic, spec, channels_last, training):
    """With the device-generic kernels the lean unit still equals the plain composition (float64)."""
    _assert_lean_equals_plain(spec, size=7, training=training, channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_generic_map_dot_and_stats(device_generic, channels_last):
    """einsum / multiply-and-sum give the depthwise conv's values and kernel gradient, and
    batch_norm_update_stats the float64 batch statistics, as the CPU loops do."""
    x = _assert_map_dot_and_weighted_sum_equal_the_conv(channels_last)
    mean, var, _ = batch_stats(x, None, None, 0.1, torch.float64)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), correction=0))


# --- fuzzing the lean unit against the plain composition -----------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.sampled_from(list_context_specs()),
    n=st.integers(0, 3),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    channels_last=st.booleans(),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_lean_equals_plain(spec, n, height, width, channels_last, training, seed):
    """Any variant, batch size (0 included), map size (1x1 and odd non-square included), layout and
    mode at float64: the lean unit gives the plain composition's output, gradients and buffers, or
    raises the same error type (e.g. one value per channel in training)."""
    torch.manual_seed(seed)
    bn = BatchNorm2d(4).double().train(training)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    context = create_context(spec, 4, feature_size=(5, 5)).double().train(training)  # resampled kernel
    for p in context.parameters():
        nn.init.normal_(p, std=0.3)
    z = torch.randn(n, 4, height, width, dtype=torch.float64) * 2 + 0.5
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    bn2, context2 = copy.deepcopy(bn), copy.deepcopy(context)
    try:
        plain = _run(bn, context, z, lean=False, grad_seed=seed)
    except (ValueError, RuntimeError) as err:
        with pytest.raises(type(err)):
            _run(bn2, context2, z, lean=True, grad_seed=seed)
        return
    lean = _run(bn2, context2, z, lean=True, grad_seed=seed)
    for got, expected in zip(lean[:2], plain[:2], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9, equal_nan=True)
    for group in (2, 3):
        assert lean[group].keys() == plain[group].keys()
        for name, expected in plain[group].items():
            if expected is None or lean[group][name] is None:
                assert lean[group][name] is None and expected is None, name
                continue
            torch.testing.assert_close(lean[group][name], expected, atol=1e-9, rtol=1e-9, equal_nan=True, msg=name)


# --- the module, chosen at build time, and the operator API it uses -------------------------------


def _unit_output_is_lean(unit, z):
    return _lean_ran(unit.norm_context(z, unit.bn3, unit.context))


def test_the_choice_is_made_when_the_model_is_built():
    """A model built while the lean path is forbidden stays plain; one built while it is allowed is
    lean, and the global switch still turns it off at call time (for benchmarks)."""
    from gather_excite.models.resnet import ResNet

    z = torch.randn(2, 256, 8, 8, requires_grad=True)
    set_lean(False)
    plain_unit = ResNet((1, 1, 1, 1), context_layer="ge_theta_e2", input_size=32).layer1[0]
    set_lean(True)
    lean_unit = ResNet((1, 1, 1, 1), context_layer="ge_theta_e2", input_size=32).layer1[0]
    assert not plain_unit.norm_context.lean and lean_unit.norm_context.lean
    assert not _unit_output_is_lean(plain_unit, z)
    assert _unit_output_is_lean(lean_unit, z)
    set_lean(False)
    assert not _unit_output_is_lean(lean_unit, z)
    assert "lean=True" in repr(lean_unit.norm_context)
    assert not any("norm_context" in key for key in lean_unit.state_dict())  # it holds no state


def test_a_converted_norm_layer_is_seen_and_takes_the_plain_path():
    """The unit passes its current norm layer on each call: after FrozenBatchNorm2d replaces bn3
    (as the detection backbone does), the unit runs it, plainly, with the same output in eval mode."""
    from torchvision.ops import FrozenBatchNorm2d

    from gather_excite.models.resnet import ResNet

    unit = ResNet((1, 1, 1, 1), context_layer="ge_theta_plus_e2", input_size=32).layer1[0].eval()
    z = torch.randn(2, 256, 8, 8, requires_grad=True)
    expected = unit.context(unit.bn3(z))
    assert _unit_output_is_lean(unit, z)
    frozen = FrozenBatchNorm2d(256, eps=unit.bn3.eps)
    frozen.weight.copy_(unit.bn3.weight.detach())
    frozen.bias.copy_(unit.bn3.bias.detach())
    frozen.running_mean.copy_(unit.bn3.running_mean)
    frozen.running_var.copy_(unit.bn3.running_var)
    unit.bn3 = frozen
    out = unit.norm_context(z, unit.bn3, unit.context)
    assert not _lean_ran(out)
    torch.testing.assert_close(out, expected)


def test_functorch_grad_steps_aside_and_equals_autograd():
    """torch.func.grad through a lean-eligible unit (eval-mode BN, parameters requiring grad) gives
    the input gradient that torch.autograd.grad gives; the lean function has no functorch rule."""
    set_lean(True)
    bn, context = _unit("ge_theta_e2", 8, 8)
    bn.eval()
    context.eval()  # functorch refuses the in-place running-stat updates of training mode, plain or lean
    z = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    expected = torch.autograd.grad(norm_context(bn, context, z.requires_grad_()).square().sum(), z)[0]
    got = torch.func.grad(lambda x: norm_context(bn, context, x).square().sum())(z.detach())
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spec", list_context_specs())
@pytest.mark.parametrize("size", [(12, 12), (7, 5)])
def test_gather_split_recomposes_the_gather(spec, size):
    """The operator's lean API: a global gather's split, ``rest(sum_hw(weights * x))``, is the
    gather's output (a windowed gather has none: the lean path runs it whole), and ``gate_from``
    of the gathered map is the gate the operator multiplies by (float64)."""
    torch.manual_seed(0)
    context = create_context(spec, 8, feature_size=10).double()  # 10 px: the global kernel is resampled
    x = torch.randn(3, 8, *size, dtype=torch.float64)
    split = context.gather_split(size)
    reference = context.gather(x) if hasattr(context, "gather") else x.mean((2, 3), keepdim=True)
    if split is None:
        assert context.extent is not None or "max" in spec  # windows, or a global max
        gathered = reference
    else:
        gathered = split.rest((x * split.weights).sum((2, 3), keepdim=True))
        torch.testing.assert_close(gathered, reference)
    gate = F.interpolate(context.gate_from(gathered), size=size, mode="nearest")
    torch.testing.assert_close(x * gate, context(x))


@pytest.mark.parametrize("spec", list_context_specs())
def test_a_gate_hook_returning_a_constant_equals_plain(spec):
    """A hook that switches the gating off (a constant gate) made the lean backward fail: it asked for
    the gradient of a recording that no longer depended on anything. The gate then carries no gradient,
    as in the plain composition: outputs, input, BN and context gradients and buffers agree."""
    bn, context = _unit(spec, 8, 12)
    context.gate.register_forward_hook(lambda module, inputs, gate: torch.full_like(gate, 0.5))
    z = torch.randn(3, 8, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = _run(copy.deepcopy(bn), copy.deepcopy(context), z, lean=False)
    lean = _run(bn, context, z, lean=True)
    assert _lean_ran(lean[0])
    for got, expected in zip(lean[:2], plain[:2], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    for group in (2, 3):
        assert lean[group].keys() == plain[group].keys()
        for name, value in plain[group].items():
            if value is None:  # the context's parameters: no path to the output in either
                assert lean[group][name] is None, name
            else:
                torch.testing.assert_close(lean[group][name], value, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("spec", ["se", "ge_theta_e2"])
def test_a_gate_hook_using_an_outside_parameter_is_refused_not_silently_wrong(spec):
    """The lean function takes the context's parameters only: a gate that a hook scales by a parameter
    of its own lost that parameter's gradient without a word (None, where the plain path gives one)."""
    bn, context = _unit(spec, 8, 12)
    alpha = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    context.gate.register_forward_hook(lambda module, inputs, gate: gate * alpha)
    z = torch.randn(3, 8, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _run(copy.deepcopy(bn), copy.deepcopy(context), z, lean=False)  # the plain path: alpha gets its gradient
    with pytest.raises(RuntimeError, match=r"depends on a tensor outside the context module .*set_lean\(False\)"):
        _run(bn, context, z, lean=True)
