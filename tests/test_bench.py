"""`gex bench`: the saved-bytes counter and the JSON report (never timings: the machine is shared)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gather_excite.cli import bench


def test_saved_bytes_counts_each_storage_once_and_skips_parameters():
    """x * x saves x twice (one 4000-byte storage); exp saves its output; a Linear's weight is skipped."""
    x = torch.randn(1000, requires_grad=True)
    assert bench.saved_bytes(lambda: (x * x).sum()) == 1000 * 4
    assert bench.saved_bytes(lambda: (x * x).exp().sum()) == 2 * 1000 * 4
    linear = nn.Linear(1000, 1, bias=False)
    # linear saves its input x (4000 bytes) and its weight (a parameter, excluded).
    assert bench.saved_bytes(lambda: linear(x.view(1, -1)).sum(), exclude=(linear,)) == 1000 * 4


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


@pytest.mark.slow  # imports timm and builds 2048-channel units: ~5-20 s on a shared 2-core machine
def test_gex_bench_op_json(capsys):
    """One variant at the smallest stage shape: the fused path keeps half the plain path's bytes."""
    assert bench.main(["op", "--variants", "ge_theta_minus", "--stages", "4", "--batch", "1", "--repeats", "1",
                       "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    (row,) = doc["rows"]
    assert row["variant"] == "ge_theta_minus" and (row["channels"], row["size"]) == (2048, 7)
    # plain keeps z and BN(z), 2048*49*4 bytes each; fused keeps z and a few per-channel tensors.
    full, per_channel = 2048 * 7 * 7 * 4, 2048 * 4
    assert row["saved_bytes"]["plain"] >= 2 * full
    assert full <= row["saved_bytes"]["ours"] <= full + 8 * per_channel
    assert doc["environment"]["torch"] == torch.__version__
