"""Bad input to every command is one line naming the argument and what was expected (exit 2), never a
traceback, and a value is never silently read as something else (``--subset 0`` as "all images").

Each case below was a traceback, or was accepted, before: the comment beside it says which.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from gather_excite import create_model
from gather_excite.cli import main as gex_main
from gather_excite.errors import CheckpointError, ConfigError, GexError
from test_detect_cli import TINY_MODEL, write_coco, write_recipe


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of ``gex ARGV``, which exits 2 (argparse's exit, or the command's own return)."""
    try:
        code = gex_main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # 0 was "unset" (all images, the checkpoint's batch size); -3 an IndexError; -1 a DataLoader ValueError
        (["eval", "x.ckpt", "--subset", "0"], "argument --subset: expected an int >= 1, got '0'"),
        (["detect", "eval", "x.ckpt", "--subset", "-3"], "argument --subset: expected an int >= 1, got '-3'"),
        (["detect", "eval", "x.ckpt", "--batch-size", "0"], "argument --batch-size: expected an int >= 1, got '0'"),
        (["eval", "x.ckpt", "--num-workers", "-1"], "argument --num-workers: expected an int >= 0, got '-1'"),
        # gex analyze named the datamodule's arguments (val_subset, eval_batch_size), not its flags
        (["analyze", "selectivity", "x.ckpt", "--subset", "0"], "argument --subset: expected an int >= 1, got '0'"),
        (["analyze", "prune", "x.ckpt", "--batch-size", "0"], "argument --batch-size: expected an int >= 1"),
        (["detect", "eval", "x.ckpt", "--accelerator", "foo"], "argument --accelerator: invalid choice: 'foo'"),
        (["eval", "CKPT", "--precision", "bogus"], "precision='bogus': Precision 'bogus' is invalid"),
        pytest.param(
            ["eval", "CKPT", "--accelerator", "gpu"],
            "accelerator='gpu', precision=None: No supported gpu backend",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="names the flag where no GPU is"),
        ),
        # numpy's "expected non-negative integer"; an OverflowError converting infinity to pixels
        (["detect", "data", "--out", "OUT", "--seed", "-1"], "seed must be an int >= 0"),
        (["detect", "data", "--out", "OUT", "--max-scale", "inf"], "scales must be finite, got 0.75, inf"),
    ],
)
def test_a_bad_value_is_one_line(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "CKPT" in argv:  # a checkpoint that loads, so that the evaluation's Trainer is built
        from test_safety import _hand_made_checkpoint

        checkpoint = _hand_made_checkpoint(tmp_path / "model.ckpt", tmp_path / "data")
        argv = [str(checkpoint) if arg == "CKPT" else arg for arg in argv]
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in argv]
    assert expected in _refused(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_bench_with_one_image_names_the_batch_norm_that_needs_two() -> None:
    """A global GE-θ gather's BatchNorm sees one value per image: a training step of one image was
    PyTorch's "Expected more than 1 value per channel when training" traceback (GE-θ− runs at batch 1)."""
    with pytest.raises(SystemExit, match=r"^gex bench op: --batch 1: a BatchNorm sees one value per channel"):
        gex_main(["bench", "op", "--variants", "ge_theta", "--batch", "1", "--repeats", "1", "--stages", "4", "--json"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"backbone": "resnet5"}, "unknown model name 'resnet5'. Did you mean 'resnet50'"),  # a ValueError traceback
        ({"fpn_channels": 0}, "fpn_channels must be an int >= 1, got 0"),  # a RuntimeError from the conv
        ({"warmup_steps": -5}, "warmup_steps must be an int >= 0, got -5"),  # accepted
        ({"warmup_factor": 0.0}, "warmup_factor must be in (0, 1], got 0.0"),
    ],
)
def test_detector_arguments_are_checked_before_anything_is_built(overrides: dict, expected: str) -> None:
    from gather_excite.detection import DetectionModule

    with pytest.raises(ConfigError) as caught:
        DetectionModule(**{**TINY_MODEL, "categories": [{"id": 1, "name": "a"}], **overrides})
    assert expected in str(caught.value)


def test_an_unknown_stage_is_a_gex_error_the_commands_print_in_one_line() -> None:
    """``gex analyze selectivity --stage stage9`` printed the ValueError's traceback: it was raised
    outside ``analysis/``, where the command converts ValueErrors."""
    from gather_excite.models import residual_units

    model = create_model("cifar_resnet20", width=4)
    with pytest.raises(GexError, match=r"stage must be one of the model's stages \['stage1', 'stage2', 'stage3'\]"):
        list(residual_units(model, "stage9"))


def test_an_incomplete_report_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "prune.json"
    report.write_text(json.dumps({"analysis": "prune"}))  # was KeyError: 'units'
    line = _refused(["analyze", "plot", str(report)], capsys)
    assert line.endswith(f"report {str(report)!r} is not a complete prune report (KeyError: 'units')")
    assert not report.with_suffix(".png").exists()


def test_curves_of_a_detection_run_say_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A detection run has csv/metrics.csv and an eval.json, but no top-1 errors: the message said
    "has no metrics.csv" although the file was there."""
    run = tmp_path / "det"
    (run / "csv").mkdir(parents=True)
    (run / "csv" / "metrics.csv").write_text("epoch,step,val/AP,train/loss_step\n0,1,0.1,2.0\n")
    (run / "eval.json").write_text(json.dumps({"model": "resnet50", "AP": 0.1}))
    line = _refused(["analyze", "curves", str(run), "--out", str(tmp_path / "out")], capsys)
    assert "metrics.csv' logs none of ['train/top1_err', 'val/top1_err']" in line, line


def test_a_validation_set_without_boxes_is_reported_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """COCOeval has nothing to average without ground-truth boxes: AP is ``null`` in eval.json, and the
    summary line used to format ``None`` with ``:.3f`` (a TypeError after the whole evaluation). With
    ``--trainer.max_epochs 0`` no checkpoint is written: eval.json named ``last.ckpt`` all the same."""
    root = write_coco(tmp_path / "coco")
    recipe = write_recipe(tmp_path / "tiny.yaml", root, epochs=1)
    untrained = tmp_path / "untrained"
    assert (
        gex_main(["detect", "train", "--config", str(recipe), "--out", str(untrained), "--trainer.max_epochs", "0"])
        == 0
    )
    assert not (untrained / "checkpoints" / "last.ckpt").exists()
    assert json.loads((untrained / "eval.json").read_text())["checkpoint"] is None
    run = tmp_path / "run"
    assert gex_main(["detect", "train", "--config", str(recipe), "--out", str(run)]) == 0
    empty = tmp_path / "empty"
    write_coco(empty)
    coco = json.loads((empty / "instances.json").read_text())
    (empty / "instances.json").write_text(json.dumps({**coco, "annotations": []}))
    capsys.readouterr()
    out = tmp_path / "eval.json"
    argv = ["detect", "eval", str(run / "checkpoints" / "last.ckpt"), "--data-root", str(empty), "--out", str(out)]
    assert gex_main(argv) == 0
    assert "AP n/a (no ground-truth boxes)" in capsys.readouterr().out
    assert json.loads(out.read_text())["AP"] is None


def test_backbone_init_checks_the_resnet_layout(tmp_path: Path) -> None:
    """Shapes cannot tell torchvision's v1.5 ResNet (stride on the 3x3 conv) from the v1 layout (on the
    first 1x1): weights that record theirs must match the backbone's, a bare state dict gets a warning."""
    from gather_excite.detection import load_backbone_state
    from gather_excite.hub import save_pretrained

    v15 = create_model("resnet50", stride_in_1x1=False, num_classes=10)
    folder = save_pretrained(
        v15, tmp_path / "v15", architecture="resnet50", model_args={"num_classes": 10, "stride_in_1x1": False}
    )
    with pytest.raises(CheckpointError, match=r"stride_in_1x1=False.*set backbone_kwargs: \{stride_in_1x1: false\}"):
        load_backbone_state(folder, "resnet50")
    state = load_backbone_state(folder, "resnet50", {"stride_in_1x1": False})
    assert torch.equal(state["layer2.0.conv2.weight"], v15.state_dict()["layer2.0.conv2.weight"])

    bare = tmp_path / "bare.pth"
    torch.save(v15.state_dict(), bare)
    with pytest.warns(UserWarning, match="bare state dict loaded into the v1 layout"):
        load_backbone_state(bare, "resnet50")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backbone_state(bare, "resnet50", {"stride_in_1x1": False})


def test_resolve_data_config_of_a_layer_says_what_it_takes() -> None:
    """A module with no Conv2d (one of our layers) gave a bare, empty StopIteration."""
    from gather_excite import GatherExcite, resolve_data_config

    with pytest.raises(TypeError, match="model GatherExcite has no pretrained_cfg and no Conv2d"):
        resolve_data_config(GatherExcite(8))


def test_operator_arguments_are_checked_whatever_the_variant() -> None:
    """``strict_size="yes"`` was accepted (and printed), ``reduction=-1`` and ``feature_size=-3`` were
    accepted where the variant does not use them, and an empty map failed differently in every gather."""
    from gather_excite import GatherExcite, SqueezeExcite

    with pytest.raises(TypeError, match="strict_size must be a bool, got str"):
        GatherExcite(8, gather="conv", feature_size=7, strict_size="yes")
    with pytest.raises(ValueError, match="reduction must be an int >= 1, got -1"):
        GatherExcite(8, reduction=-1)
    with pytest.raises(ValueError, match="feature_size must be an int >= 1"):
        GatherExcite(8, feature_size=-3)
    empty = torch.randn(2, 8, 0, 3)
    for module in (GatherExcite(8), GatherExcite(8, gather="max"), GatherExcite(8, 2, gather="conv"), SqueezeExcite(8)):
        with pytest.raises(ValueError, match="input has an empty spatial size 0x3; expected at least 1x1"):
            module(empty)


def test_a_model_name_is_built_at_its_own_input_size() -> None:
    """``gex export``/``load_model`` of a CIFAR model name built it at 224 px (global GE-θ kernels of
    56x56, 4.5 M parameters), where ``create_model`` builds it at 32 (420,760 parameters)."""
    from gather_excite.engine import load_model

    loaded = load_model("ge_theta_cifar_resnet20").net
    built = create_model("ge_theta_cifar_resnet20")
    assert loaded.input_size == built.input_size == (32, 32)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in built.parameters()) == 420760
    assert load_model("resnet50").net.input_size == (224, 224)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- 1\n- 2\n", "expected a YAML mapping of settings (model:, data:, trainer:, ...), found a list"),
        ("", "expected a YAML mapping of settings (model:, data:, trainer:, ...), found an empty file"),
        ("model:\n  arch: [resnet\n", "not valid YAML at line 3, column 1: expected ',' or ']'"),
    ],
    ids=["list", "empty", "truncated"],
)
@pytest.mark.parametrize("command", [["train"], ["detect", "train"]])
def test_a_config_file_that_is_not_a_mapping_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], text: str, expected: str
) -> None:
    """jsonargparse said "Unexpected config: - 1 - 2" or "Problems parsing config: ... in <unicode string>",
    naming neither the file nor, for an empty one, the problem."""
    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    assert f"--config {config}: {expected}" in _refused([*command, "--config", str(config)], capsys)
