"""`gex bench`: the saved-bytes counter and the JSON report (never timings: the machine is shared)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gather_excite import bench
from gather_excite.cli import bench as bench_cli


def test_saved_bytes_counts_each_storage_once_and_skips_parameters():
    """x * x saves x twice (one 4000-byte storage); exp saves its output; a Linear's weight is skipped."""
    x = torch.randn(1000, requires_grad=True)
    assert bench.saved_bytes(lambda: (x * x).sum()) == 1000 * 4
    assert bench.saved_bytes(lambda: (x * x).exp().sum()) == 2 * 1000 * 4
    linear = nn.Linear(1000, 1, bias=False)
    # linear saves its input x (4000 bytes) and its weight (a parameter, excluded).
    assert bench.saved_bytes(lambda: linear(x.view(1, -1)).sum(), exclude=(linear,)) == 1000 * 4


def test_saved_bytes_of_a_train_step_counts_its_forward_pass_only():
    """A TrainStep's finish runs but what it records does not count: x * x keeps x (4000 bytes) into
    backward; exp's output (another 4000), recorded in finish, would count in a plain callable."""
    x = torch.randn(1000, requires_grad=True)

    def finish(out: torch.Tensor) -> None:
        (out + x.exp().sum()).backward()

    assert bench.saved_bytes(bench.TrainStep(lambda: (x * x).sum(), finish)) == 1000 * 4
    torch.testing.assert_close(x.grad, 2 * x + x.exp())  # finish ran: d/dx (x^2 + e^x)
    x.grad = None
    assert bench.saved_bytes(lambda: finish((x * x).sum())) == 2 * 1000 * 4


def test_time_interleaved_runs_every_step_and_rejects_unknown_clock():
    calls = {"a": 0, "b": 0}
    steps = {name: (lambda n=name: calls.__setitem__(n, calls[n] + 1)) for name in calls}
    seconds = bench.time_interleaved(steps, repeats=3, warmup=1, clock="cpu")
    assert calls == {"a": 4, "b": 4} and set(seconds) == {"a", "b"}
    try:
        bench.time_interleaved(steps, repeats=1, clock="sundial")
    except ValueError as err:
        assert "clock" in str(err)
    else:
        raise AssertionError("an unknown clock must raise ValueError")


def test_paired_ratio_takes_ratios_within_each_round():
    """Round by round the variant takes 1.1x, 1.2x, 1.0x, 1.3x, 1.05x the baseline while the machine
    slows 10x in round 3: the paired median is 1.1x (sorted 1.0, 1.05, 1.1, 1.2, 1.3), quartiles
    1.05 and 1.2; the ratio of the two medians (1.56 / 1.2 = 1.3) would be off."""
    base = [1.0, 1.0, 10.0, 1.2, 2.0]
    variant = [1.1, 1.2, 10.0, 1.56, 2.1]
    median, q1, q3 = bench.paired_ratio({"v": variant, "b": base}, "v", "b")
    assert median == pytest.approx(1.1) and q1 == pytest.approx(1.05) and q3 == pytest.approx(1.2)
    assert bench.paired_ratio({"v": [3.0], "b": [2.0]}, "v", "b") == (1.5, 1.5, 1.5)


@pytest.mark.slow  # imports timm and builds 2048-channel units
def test_gex_bench_op_json(capsys):
    """One variant at the smallest stage shape: the lean path keeps half the plain path's bytes."""
    assert bench_cli.main(["op", "--variants", "ge_theta_minus", "--stages", "4", "--batch", "1", "--repeats", "1",
                       "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    (row,) = doc["rows"]
    assert row["variant"] == "ge_theta_minus" and (row["channels"], row["size"]) == (2048, 7)
    # plain keeps z and BN(z), 2048*49*4 bytes each; the lean path keeps z and a few per-channel tensors.
    full, per_channel = 2048 * 7 * 7 * 4, 2048 * 4
    assert row["saved_bytes"]["plain"] >= 2 * full
    assert full <= row["saved_bytes"]["ours"] <= full + 8 * per_channel
    assert doc["environment"]["torch"] == torch.__version__


def test_gex_bench_net_json(capsys):
    """ResNet-50 vs GE-θ− ResNet-50 at 64 px: the baseline's paired ratio to itself is exactly 1,
    and the lean path keeps fewer bytes than the plain composition (which also keeps BN(z))."""
    assert bench_cli.main(["net", "--models", "resnet50", "ge_theta_minus_resnet50", "--batch", "2",
                       "--image-size", "64", "--repeats", "2", "--threads", "1", "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    rows = {(row["model"], row["path"]): row for row in doc["rows"]}
    assert set(rows) == {
        ("resnet50", "plain"),
        ("ge_theta_minus_resnet50", "plain"),
        ("ge_theta_minus_resnet50", "ours"),
    }
    base = rows["resnet50", "plain"]
    assert base["time_vs_baseline"] == 1.0 and base["time_vs_baseline_quartiles"] == [1.0, 1.0]
    assert len(base["samples"]) == 2 and base["bytes_vs_baseline"] == 1.0
    assert (
        rows["ge_theta_minus_resnet50", "ours"]["saved_bytes"] < rows["ge_theta_minus_resnet50", "plain"]["saved_bytes"]
    )
    assert "allocator" in doc["environment"]


def test_gex_bench_net_bf16_autocast_records_it_and_keeps_the_lean_saving(capsys):
    """--bf16 runs forward and loss under torch.autocast(bfloat16) (here on the CPU); the row
    says so, and the lean path still keeps fewer bytes than the plain composition."""
    assert bench_cli.main(["net", "--models", "resnet50", "ge_theta_resnet50", "--batch", "2", "--image-size", "32",
                       "--repeats", "1", "--threads", "1", "--bf16", "--json"]) == 0  # fmt: skip
    rows = {(r["model"], r["path"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert {r["autocast"] for r in rows.values()} == {"bfloat16"} and {r["device"] for r in rows.values()} == {"cpu"}
    assert rows["ge_theta_resnet50", "ours"]["saved_bytes"] < rows["ge_theta_resnet50", "plain"]["saved_bytes"]


def test_check_device_names_the_problem():
    with pytest.raises(ValueError, match="torch device string"):
        bench.check_device("gpu please", "wall")
    with pytest.raises(ValueError, match="clock='cpu'"):
        bench.check_device("meta", "cpu")
    assert bench.check_device("cpu", "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            bench_cli.main(["net", "--device", "cuda", "--repeats", "1"])


def test_unknown_variant_or_model_is_one_line_before_any_work():
    with pytest.raises(SystemExit, match=r"^gex bench op: --variants: unknown context spec 'ge_thta'.*'ge_theta'"):
        bench_cli.main(["op", "--variants", "ge_theta", "ge_thta"])
    with pytest.raises(SystemExit, match=r"^gex bench net: --models: unknown model name 'resnet5O'.*'resnet50'"):
        bench_cli.main(["net", "--models", "resnet50", "resnet5O"])
