"""gex train / gex eval on tiny real-format data: loss falls, eval JSON, checkpoints, resume, bad inputs."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gather_excite import create_model
from gather_excite.cli import evaluate as eval_cli
from gather_excite.cli import train as train_cli
from gather_excite.configs import BASES, RECIPES, base_path
from gather_excite.engine import ClassificationModule, atomic_torch_save, load_for_evaluation, load_model
from test_data import write_cifar10, write_fashion_idx, write_image_folder

TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_model_summary": False,
    "enable_progress_bar": False,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}


# A width-4 ResNet-20 for the Fashion-MNIST files of test_data: seconds an epoch on one core.
TINY_FASHION_MODEL = {"arch": "cifar_resnet20", "arch_kwargs": {"width": 4}, "num_classes": 10, "in_chans": 1,
                      "input_size": 28}  # fmt: skip


def write_config(path: Path, *, model: dict[str, Any], data: dict[str, Any], epochs: int) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"lr": 0.05, "weight_decay": 0.0, "schedule": "constant", **model},
        "data": {"num_workers": 0, "augment": False, **data},
        "trainer": {**TRAINER, "max_epochs": epochs},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def epoch_losses(out: Path) -> list[float]:
    with open(out / "csv" / "metrics.csv") as handle:
        return [float(row["train/loss_epoch"]) for row in csv.DictReader(handle) if row.get("train/loss_epoch")]


def assert_plain(value: Any, where: str = "hyper_parameters") -> None:
    """Only the types torch.load(weights_only=True) accepts without allow-listing."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), where
            assert_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            assert_plain(item, f"{where}[{index}]")
    else:
        assert value is None or isinstance(value, (bool, int, float, str)), f"{where} is {type(value).__name__}"


DATASETS = {
    # name -> (writer, model settings, data settings)
    "imagefolder": (
        lambda root: write_image_folder(root, per_class=6),
        {"num_classes": 2, "in_chans": 3, "input_size": 16},
        {"dataset": "imagefolder", "batch_size": 4, "crop_size": 16, "resize_size": 18},
    ),
    "cifar10": (
        lambda root: write_cifar10(root, per_batch=8),
        {"num_classes": 10, "in_chans": 3, "input_size": 32},
        {"dataset": "cifar10", "batch_size": 8},
    ),
    "fashion_mnist": (
        lambda root: write_fashion_idx(root, train=48, test=16),
        {"num_classes": 10, "in_chans": 1, "input_size": 28},
        {"dataset": "fashion_mnist", "batch_size": 12},
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def train_tiny(tmp_path: Path, dataset: str, *, epochs: int, arch: str = "cifar_resnet20") -> Path:
    writer, model, data = DATASETS[dataset]
    root = writer(tmp_path / "data")
    config = write_config(
        tmp_path / "config.yaml",
        model={"arch": arch, "arch_kwargs": {"width": 4}, **model},
        data={"root": str(root), **data},
        epochs=epochs,
    )
    out = tmp_path / "run"
    assert train_cli.main(["--config", str(config), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_training_lowers_the_loss_and_eval_writes_json(tmp_path: Path, dataset: str) -> None:
    out = train_tiny(tmp_path, dataset, epochs=4)
    losses = epoch_losses(out)
    # Classes that differ in mean brightness: four epochs of SGD must cut the mean training loss (the
    # 48 Fashion-MNIST images, 16 steps in all, by 19% in the seed-0 batch order).
    assert len(losses) == 4 and losses[-1] < 0.85 * losses[0], losses
    result = json.loads((out / "eval.json").read_text())
    model, data = DATASETS[dataset][1], DATASETS[dataset][2]
    expected_params = sum(p.numel() for p in create_model("cifar_resnet20", width=4, **model).parameters())
    assert result["model"] == "cifar_resnet20" and result["dataset"] == data["dataset"]
    assert result["params"] == expected_params and result["macs"] > 0
    assert 0.0 <= result["top5_err"] <= result["top1_err"] <= 100.0
    assert result["crop"] == [model["in_chans"], model["input_size"], model["input_size"]]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 3
    assert_plain(checkpoint["hyper_parameters"])
    assert_plain(checkpoint["datamodule_hyper_parameters"], "datamodule_hyper_parameters")


def test_gex_eval_and_load_for_evaluation_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = train_tiny(tmp_path, "fashion_mnist", epochs=1)
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert eval_cli.main([str(checkpoint), "--out", str(tmp_path / "e.json"), "--accelerator", "cpu"]) == 0
    written = json.loads((tmp_path / "e.json").read_text())
    module, data = load_for_evaluation(checkpoint)
    data.setup("validate")
    images, labels = zip(*(data.val_set[i] for i in range(len(data.val_set))), strict=True)
    with torch.no_grad():
        predictions = module(torch.stack(images)).argmax(1)
    # The JSON's top-1 error equals the error recomputed by hand from the loaded model.
    by_hand = 100.0 * (predictions != torch.tensor(labels)).float().mean().item()
    assert written["top1_err"] == pytest.approx(by_hand, abs=1e-4) and written["num_images"] == 16
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 10, requested 100"):
        load_model(checkpoint, num_classes=100)
    fresh = load_model("ge_theta_cifar_resnet20", num_classes=7, input_size=32)
    assert fresh.net.fc.out_features == 7 and not fresh.training


def test_resuming_a_different_model_names_the_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = train_tiny(tmp_path, "fashion_mnist", epochs=1)
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    code = train_cli.main(
        [
            *("--config", str(tmp_path / "config.yaml"), "--out", str(out), "--resume", "last"),
            *("--model.arch", "se_cifar_resnet20", "--trainer.max_epochs", "2"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert "arch: checkpoint 'cifar_resnet20', this run 'se_cifar_resnet20'" in error, error
    assert last.read_bytes() == before  # nothing lost


def test_resume_continues_and_a_fresh_run_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = train_tiny(tmp_path, "fashion_mnist", epochs=1)
    config = str(tmp_path / "config.yaml")
    assert train_cli.main(["--config", config, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_cli.main(["--config", config, "--out", str(out), "--resume", "last", "--trainer.max_epochs", "2"]) == 0
    final = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    # 48 images in batches of 12: 4 steps an epoch; the second epoch continued from step 4.
    assert final["epoch"] == 1 and final["global_step"] == 8
    # The first run's CSV rows survive the restart: one metrics.csv with both epochs.
    assert len(epoch_losses(out)) == 2
    # The saved config starts the run again elsewhere: it held "resume: last", which a new --out refused.
    saved = yaml.safe_load((out / "tensorboard" / "config.yaml").read_text())
    assert saved["resume"] is None and saved["trainer"]["max_epochs"] == 2


def test_unknown_config_key_names_it_and_the_valid_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  arch: cifar_resnet20\n  learning_rate: 0.1\n")
    assert train_cli.main(["--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "unknown config key 'model.learning_rate'" in error
    assert "valid keys of 'model': arch, num_classes" in error and "lr" in error
    assert train_cli.main(["--data.batchsize", "8"]) == 2
    assert (
        "unknown config key 'data.batchsize' in the command line (did you mean 'batch_size'" in capsys.readouterr().err
    )
    assert train_cli.main(["--modle.lr", "0.1"]) == 2  # an unknown group: "valid keys of 'modle':" and nothing
    assert "unknown config key 'modle' in the command line (did you mean 'model'?)" in capsys.readouterr().err


def test_print_config_and_packaged_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main(["--config", "imagenet_ge_theta_resnet50", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # Section 3 recipe: batch 256, lr 0.1 divided by 10 at plateaus three times, momentum 0.9.
    assert printed["model"]["arch"] == "ge_theta_resnet50" and printed["data"]["batch_size"] == 256
    assert printed["model"]["lr"] == 0.1 and printed["model"]["schedule"] == "plateau"
    assert printed["model"]["plateau_drops"] == 3 and printed["model"]["momentum"] == 0.9


def test_every_paper_row_is_one_command_that_the_parser_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    # ImageNet: Figure 2 (6) + Table 1 (3) + 2x5 + ResNet-152; Figure 4 (2) + ShuffleNet 7 + CIFAR 2x3x5 +
    # Fashion-MNIST 5.
    assert len(RECIPES) == 64
    packaged = sorted(path.stem for path in base_path("imagenet").parent.glob("*.yaml"))
    assert packaged == sorted(BASES)  # one base recipe per dataset and schedule, nothing else
    for base in BASES:
        first_line = base_path(base).read_text().split("\n", 1)[0]
        assert "Section" in first_line or "counterpart" in first_line, base
    for recipe in RECIPES.values():
        # The documented command, parsed and validated by the real parser (as gex train runs it).
        assert train_cli.main([*shlex.split(recipe.command)[2:], "--print_config"]) == 0, recipe.name
        printed = yaml.safe_load(capsys.readouterr().out)
        dataset = {"imagenet": "imagefolder", "cifar10": "cifar10", "cifar100": "cifar100", "fashion": "fashion_mnist"}
        assert printed["model"]["arch"] == recipe.arch
        assert (printed["model"]["arch_kwargs"] or {}) == recipe.model_arch_kwargs(), recipe.name
        assert printed["data"]["dataset"] == dataset[recipe.name.split("_")[0]], recipe.name
    # Table 5's WRN schedule (Zagoruyko & Komodakis): lr x0.2 at 60/120/160, Nesterov, wd 5e-4, 200 epochs.
    assert train_cli.main(["--config", "cifar100_ge_theta_plus_wrn16_8", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["arch"] == "ge_theta_plus_wrn16_8" and printed["model"]["num_classes"] == 100
    assert printed["model"]["milestones"] == [60, 120, 160] and printed["model"]["gamma"] == 0.2
    assert printed["model"]["nesterov"] and printed["model"]["weight_decay"] == 5e-4
    assert printed["trainer"]["max_epochs"] == 200
    # A later --model.arch overrides a row's model, as any later argument overrides the config.
    assert train_cli.main(["--config", "imagenet_resnet50", "--model.arch", "se_resnet50", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["arch"] == "se_resnet50"


def test_list_recipes_prints_every_row_with_its_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main(["--list-recipes"]) == 0
    printed = capsys.readouterr().out
    assert (
        "GE-θ (global) ResNet-50" in printed and "gex train --config imagenet --model.arch ge_theta_resnet50" in printed
    )
    assert "gex train --config imagenet_shufflenet --model.arch ge_theta_e8_shufflenet_g3" in printed
    rows = [line.split() for line in printed.splitlines() if "gex train --config " in line]
    assert len(rows) == 64
    # Each row names itself (the error for an unknown --config points here): the name is the same command.
    names = [next(cell for cell in row if cell in RECIPES) for row in rows]
    assert sorted(names) == sorted(RECIPES) and "imagenet_ge_theta_e8_shufflenet_g3" in names


def test_link_target_and_unknown_recipe_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main(["--config", "imagenet", "--trainer.default_root_dir", "elsewhere"]) == 2
    assert "--trainer.default_root_dir is set from --out; pass --out instead" in capsys.readouterr().err
    assert train_cli.main(["--config", "imagenett"]) == 2
    error = capsys.readouterr().err
    assert "--config imagenett: no such file, base recipe or paper row" in error and "--list-recipes" in error


def test_an_error_without_a_config_is_one_line_and_the_seed_defaults_to_0(capsys: pytest.CaptureFixture[str]) -> None:
    """No recipe, no seed: seed 0 (what Lightning picks), without its "No seed found" warning before the error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_cli.main(["--model.arch", "nope"]) == 2
    assert [str(w.message) for w in caught if "seed" in str(w.message).lower()] == []
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["gex train: error: arch='nope' is not a registered model; gather_excite.list_models() names all"]
    assert train_cli.main(["--model.arch", "cifar_resnet20", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed_everything"] == 0


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)

    def dying_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    # The old checkpoint is intact and no temporary file is left behind.
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_kill_mid_epoch_then_resume_finishes(tmp_path: Path) -> None:
    root = write_fashion_idx(tmp_path / "data", train=1200, test=20)  # 120 steps an epoch
    config = write_config(
        tmp_path / "config.yaml",
        model=TINY_FASHION_MODEL,
        data={"root": str(root), "dataset": "fashion_mnist", "batch_size": 10},
        epochs=3,
    )
    out = tmp_path / "run"
    command = [sys.executable, "-c", "import sys; from gather_excite.cli import main; sys.exit(main())", "train"]
    command += ["--config", str(config), "--out", str(out), "--eval_after", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        try:  # the end-of-epoch-1 checkpoint, once it is fully written
            killed = torch.load(last, weights_only=True) if last.exists() else None
        except (RuntimeError, EOFError, OSError):
            killed = None
    time.sleep(0.5)  # inside epoch 2: its 120 steps take longer than this even on a fast idle machine
    assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert killed is not None, "no end-of-epoch-1 checkpoint within 240 s"
    assert torch.load(last, weights_only=True)["global_step"] == killed["global_step"]  # no epoch-2 checkpoint yet
    assert killed["epoch"] == 0 and killed["global_step"] == 120  # the end of epoch 1 of 3
    resumed = subprocess.run([*command, "--resume", "last"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(last, weights_only=True)
    # Continued from step 120 to the end: 3 epochs of 120 steps in all.
    assert final["epoch"] == 2 and final["global_step"] == 360
    # One CSV row per training step (logged every step): the killed epoch's rows were dropped, not repeated.
    with open(out / "csv" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]
    assert sorted(steps) == list(range(360)), [step for step in steps if steps.count(step) > 1][:10]
    assert len(epoch_losses(out)) == 3


def _train_with(tmp_path: Path, *, model: dict[str, Any], trainer: dict[str, Any], epochs: int) -> Path:
    writer, model_settings, data = DATASETS["fashion_mnist"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = writer(tmp_path / "data")
    config = write_config(
        tmp_path / "config.yaml",
        model={"arch": "ge_theta_cifar_resnet20", "arch_kwargs": {"width": 4}, **model_settings, **model},
        data={"root": str(root), **data},
        epochs=epochs,
    )
    config_dict = yaml.safe_load(config.read_text())
    config_dict["trainer"].update(trainer)
    config.write_text(yaml.safe_dump(config_dict))
    out = tmp_path / "run"
    assert train_cli.main(["--config", str(config), "--out", str(out)]) == 0
    return out


def test_bf16_mixed_and_channels_last_train_a_ge_model(tmp_path: Path) -> None:
    # The options the GPU recipes use, on the CPU: bf16 autocast with float32 weights, NHWC. Same
    # seed, data and model as a float32 NCHW run, so the loss curves must stay close (bf16 keeps
    # ~3 significant digits; measured gap <= 0.28 over 4 epochs) and fall (by 9% in the seed-0 batch order).
    reference = epoch_losses(_train_with(tmp_path / "fp32", model={}, trainer={}, epochs=4))
    out = _train_with(tmp_path / "bf16", model={"channels_last": True}, trainer={"precision": "bf16-mixed"}, epochs=4)
    losses = epoch_losses(out)
    assert len(losses) == 4 and all(map(math.isfinite, losses)), losses
    assert losses[-1] < 0.95 * losses[0], losses
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 0.3, (losses, reference)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())


@pytest.mark.slow
def test_torch_compile_trains_and_keeps_state_dict_keys(tmp_path: Path) -> None:
    out = _train_with(tmp_path, model={"compile": True}, trainer={}, epochs=2)
    assert len(epoch_losses(out)) == 2
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    expected = {
        f"net.{k}"
        for k in create_model(
            "ge_theta_cifar_resnet20", width=4, num_classes=10, in_chans=1, input_size=28
        ).state_dict()
    }
    assert set(state) == expected


def _tiny_fashion_run(tmp_path: Path, *, epochs: int, model: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """The config of a 4-step-an-epoch Fashion-MNIST run (48 images, batch 12) and its --out."""
    writer, _, data = DATASETS["fashion_mnist"]
    root = writer(tmp_path / "data")
    config = write_config(
        tmp_path / "config.yaml",
        model={**TINY_FASHION_MODEL, **(model or {})},
        data={"root": str(root), **data},
        epochs=epochs,
    )
    return config, tmp_path / "run"


def _train(config: Path, out: Path, *extra: str) -> None:
    assert train_cli.main(["--config", str(config), "--out", str(out), "--eval_after", "false", *extra]) == 0


def test_a_resumed_run_keeps_the_best_checkpoint_of_the_best_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """val/top1_err 50, 30, 40 with a restart after epoch 1: best.ckpt stays epoch 1's (30)."""
    scores = [50.0, 30.0, 40.0]
    log = ClassificationModule.log

    def injected(self: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name == "val/top1_err":
            value = torch.tensor(scores[self.current_epoch])
        log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(ClassificationModule, "log", injected)
    config, out = _tiny_fashion_run(tmp_path, epochs=2)
    _train(config, out)
    # last.ckpt holds the best callback's state after its own epoch's score, not the epoch before's.
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    best_state = next(state for key, state in saved.items() if "val/top1_err" in key)
    assert float(best_state["best_model_score"]) == 30.0
    _train(config, out, "--resume", "last", "--trainer.max_epochs", "3")
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 1  # epoch 2's 40 is worse than 30: best.ckpt was not overwritten


def _record_batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int], list[float]]]:
    """(epoch, targets, per-image sums) of every training batch from now on."""
    seen: list[tuple[int, list[int], list[float]]] = []
    step = ClassificationModule.training_step

    def recording(self: Any, batch: Any, batch_idx: int) -> Any:
        images, targets = batch
        sums = [round(float(s), 3) for s in images.flatten(1).sum(1)]
        seen.append((self.current_epoch, targets.tolist(), sums))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ClassificationModule, "training_step", recording)
    return seen


def test_a_resumed_epoch_draws_the_batches_of_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record_batches(monkeypatch)
    config, out = _tiny_fashion_run(tmp_path, epochs=2)
    _train(config, out)
    uninterrupted = [batch for batch in seen if batch[0] == 1]
    assert len(uninterrupted) == 4 and uninterrupted != [batch for batch in seen if batch[0] == 0][:4]
    seen.clear()
    _train(config, tmp_path / "interrupted", "--trainer.max_epochs", "1")
    _train(config, tmp_path / "interrupted", "--resume", "last")
    assert [batch for batch in seen if batch[0] == 1] == uninterrupted


def test_the_lr_column_is_the_rate_each_epoch_trained_at(tmp_path: Path) -> None:
    config, out = _tiny_fashion_run(tmp_path, epochs=3, model={"schedule": "cosine", "lr": 0.1})
    _train(config, out)
    with open(out / "csv" / "metrics.csv") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle) if row.get("lr")]
    # Cosine over 3 epochs: 0.1 (1 + cos(pi k / 3)) / 2 for epochs k = 0, 1, 2.
    assert rates == pytest.approx([0.1, 0.075, 0.025]), rates


# What torchrun --nproc-per-node 2 sets for its first process.
TORCHRUN_2 = {
    **{"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"},
    **{"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"},
}


@pytest.mark.parametrize(
    ("overrides", "environment", "message"),
    [
        (
            ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.sync_batchnorm", "true"],
            {},
            "trainer.sync_batchnorm=true needs GPUs",
        ),
        (["--trainer.devices", "1", "--trainer.strategy", "ddp"], TORCHRUN_2, "does not match the world size (2)"),
        (["--trainer.devices", "1"], TORCHRUN_2, "torchrun started 2 processes, but the trainer runs on one device"),
        (
            ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "33"],
            {},
            "batch_size=33 is the global batch and must divide evenly over the 2 devices",
        ),
    ],
    ids=["sync_batchnorm_on_cpu", "torchrun_world_size", "torchrun_one_device", "batch_over_devices"],
)
def test_ddp_settings_that_cannot_run_are_one_line_before_any_process_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    environment: dict[str, str],
    message: str,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(subprocess, "Popen", None)  # Lightning's launcher would start rank 1 with it
    config, out = _tiny_fashion_run(tmp_path, epochs=1)
    saved = dict(os.environ)
    try:
        assert train_cli.main(["--config", str(config), "--out", str(out), *overrides]) == 2
    finally:  # the launcher, if it is reached, sets WORLD_SIZE etc. for the whole process
        os.environ.clear()
        os.environ.update(saved)
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("gex train: error: ") and message in error[0], error


def test_a_second_train_into_a_held_run_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A resubmitted job while the first still runs: both had exited 0 with their histories interleaved in
    one metrics.csv and one run's checkpoint. The first run holds its folder (the kernel's lock, taken
    here as it takes it); a second gex train into it is refused before any work."""
    from gather_excite._atomic import lock_folder

    config, out = _tiny_fashion_run(tmp_path, epochs=1)
    held = lock_folder(out, "held by the first run")
    try:
        code = train_cli.main(["--config", str(config), "--out", str(out), "--resume", "last"])
    finally:
        os.close(held)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--out {out}: another gex train is writing into this folder now" in err
    assert list(out.iterdir()) == []  # nothing written
    _train(config, out)  # released with the first run: the folder is free again


def test_a_failed_run_removes_the_folder_it_made_and_sigterm_is_not_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    config, out = _tiny_fashion_run(tmp_path, epochs=1)
    # A wrong --resume: one line, and the folder made to hold the run is gone again (it held nothing).
    assert train_cli.main(["--config", str(config), "--out", str(out), "--resume", str(tmp_path / "none.ckpt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not out.exists()

    # Lightning ends a run stopped by SIGTERM (a pre-empted job) with SystemExit(0): it was reported as success.
    def stopped(*_args: object, **_kwargs: object) -> None:
        raise SIGTERMException

    monkeypatch.setattr("lightning.pytorch.Trainer.fit", stopped)
    assert train_cli.main(["--config", str(config), "--out", str(out)]) == 143
    assert "gex train: stopped by SIGTERM before the run finished; no checkpoint yet" in capsys.readouterr().err


def test_an_unwritable_run_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, out = _tiny_fashion_run(tmp_path, epochs=1)
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out and real_access(path, mode))  # as chmod 500
    assert train_cli.main(["--config", str(config), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"gex train: error: --out {out}: the folder is not writable\n"


def test_resuming_a_finished_run_does_not_evaluate_it_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--resume last` of a run that had finished its epochs: nothing trains, and the test row was logged
    a second time into metrics.csv (and eval.json rewritten). Now it says so and changes nothing."""
    config, out = _tiny_fashion_run(tmp_path, epochs=1)
    assert train_cli.main(["--config", str(config), "--out", str(out)]) == 0
    rows, evaluation = (out / "csv" / "metrics.csv").read_text(), (out / "eval.json").read_bytes()
    capsys.readouterr()
    assert train_cli.main(["--config", str(config), "--out", str(out), "--resume", "last"]) == 0
    assert "had finished its 1 epochs; nothing to continue" in capsys.readouterr().out
    assert (out / "csv" / "metrics.csv").read_text() == rows and (out / "eval.json").read_bytes() == evaluation


def test_an_evaluation_never_replaces_a_file_written_while_it_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `gex eval` of one checkpoint at once both picked the free `eval.json` and one result was lost
    (the name was checked before the evaluation and replaced after it). The name is claimed when the
    result is written: what another command wrote meanwhile stays, this result steps to `eval-2.json`."""
    from gather_excite.cli import evaluate as evaluate_cli

    out = train_tiny(tmp_path, "fashion_mnist", epochs=1)
    checkpoint = out / "checkpoints" / "last.ckpt"
    real, default, explicit = evaluate_cli.evaluate, out / "checkpoints" / "eval.json", tmp_path / "mine.json"
    for target, flags in ((default, []), (explicit, ["--out", str(explicit)])):

        def racing(*args: Any, target: Path = target, **kwargs: Any) -> dict[str, Any]:
            target.write_text('{"by": "the other command"}\n')  # written while this evaluation runs
            return real(*args, **kwargs)

        monkeypatch.setattr(evaluate_cli, "evaluate", racing)
        assert eval_cli.main([str(checkpoint), *flags, "--accelerator", "cpu"]) == 0
        assert target.read_text() == '{"by": "the other command"}\n'
        moved = target.with_name(f"{target.stem}-2.json")
        assert json.loads(moved.read_text())["num_images"] == 16
    err = capsys.readouterr().err
    assert f"gex eval: {out / 'checkpoints' / 'eval.json'} was written by another command during the evaluation" in err


def test_resuming_with_other_decay_groups_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run started before the ImageNet recipes set norm/bias_weight_decay has one optimizer group; the
    recipe now makes three, and torch's "different number of parameter groups" was a traceback."""
    config, out = _tiny_fashion_run(tmp_path, epochs=1)
    _train(config, out)
    resume = ["--config", str(config), "--out", str(out), "--resume", "last", "--trainer.max_epochs", "2"]
    assert train_cli.main([*resume, "--model.norm_weight_decay", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the checkpoint's run had norm_weight_decay None (this run 0.0)" in err
    assert err.endswith(
        "continue it with its own settings: --model.norm_weight_decay null --model.bias_weight_decay null\n"
    )
    assert train_cli.main([*resume, "--model.norm_weight_decay", "null"]) == 0


def test_a_failed_start_removes_every_folder_it_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = _tiny_fashion_run(tmp_path, epochs=1)
    out = tmp_path / "runs" / "new" / "r1"
    assert train_cli.main(["--config", str(config), "--out", str(out), "--resume", str(tmp_path / "none.ckpt")]) == 2
    assert not (tmp_path / "runs").exists()  # runs/new was left behind
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "link")]) == 2  # was a FileExistsError
    assert "is a broken link; expected a run folder" in capsys.readouterr().err
