"""gex compare on a small IDX data set written here: table, results.json, curves.png, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gather_excite import create_model
from gather_excite.cli import compare
from test_data import write_fashion_idx

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def test_compare_writes_table_results_and_curves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_fashion_idx(tmp_path / "data", train=64, test=20)
    out = tmp_path / "out"
    argv = ["--data-root", str(root), "--out", str(out), "--epochs", "2", "--seeds", "2", "--train-size", "0"]
    argv += ["--width", "4", "--batch-size", "16", "--curve-size", "10", "--variants", "baseline,GE-θ+"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [v["model"] for v in results["variants"]] == ["cifar_resnet20", "ge_theta_plus_cifar_resnet20"]
    for variant in results["variants"]:
        model = create_model(variant["model"], num_classes=10, in_chans=1, input_size=28, width=4)
        # params are the network's parameter count; one test error per seed; 2 epochs per curve.
        assert variant["params"] == sum(p.numel() for p in model.parameters())
        assert variant["seeds"] == [0, 1] and len(variant["test_top1_err"]) == 2
        assert all(0.0 <= e <= 100.0 for e in variant["test_top1_err"]) and variant["train_images_per_s"][0] > 0
        assert [row["epoch"] for row in variant["curves"][1]] == [1, 2]
        # Each row holds its own epoch's training error (the CSV log is the reference).
        log = (out / "logs" / variant["model"] / "seed1" / "metrics.csv").read_text().splitlines()
        header = log[0].split(",")
        logged = [
            float(r.split(",")[header.index("train/top1_err")])
            for r in log[1:]
            if r.split(",")[header.index("train/top1_err")]
        ]
        assert [row["train_top1_err"] for row in variant["curves"][1]] == pytest.approx(logged)
        mean = sum(variant["test_top1_err"]) / 2
        assert variant["test_top1_err_mean"] == pytest.approx(mean)
        # 20 test images: every error is a multiple of 5 %.
        assert all(abs(e / 5 - round(e / 5)) < 1e-3 for e in variant["test_top1_err"])
        assert f"| {variant['label']} | `{variant['model']}` | {variant['params'] / 1e3:.1f} K" in printed
        checkpoint = torch.load(out / "checkpoints" / variant["model"] / "seed1" / "last.ckpt", weights_only=True)
        assert checkpoint["epoch"] == 1 and checkpoint["hyper_parameters"]["arch"] == variant["model"]
    # GE-θ+ adds the depthwise gathers, their BNs and the excite MLPs to the same backbone.
    assert results["variants"][1]["params"] > results["variants"][0]["params"]
    assert "± " in printed  # two seeds: mean ± sd
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_bad_arguments_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main(["--variants", "baseline,GE-theta", "--out", str(tmp_path)]) == 2
    assert "--variants: unknown ['GE-theta']" in capsys.readouterr().err
    assert compare.main(["--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert compare.main(["--data-root", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"data path {str(missing)!r} does not exist" in capsys.readouterr().err
