"""Untrusted files never run code, no run is overwritten, every user error is one line (issue 10)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace

from gather_excite import create_model
from gather_excite.cli import detect as detect_cli
from gather_excite.cli import evaluate as eval_cli
from gather_excite.cli import train as train_cli
from gather_excite.cli._config_guard import check_parsed_config
from gather_excite.data import cifar_dataset
from gather_excite.detection import DetectionModule
from gather_excite.engine import AtomicCheckpointIO, ClassificationModule, load_model, write_eval_json
from gather_excite.errors import CheckpointError, ConfigError, DataError, GexError, UnsafeFileError
from test_data import write_cifar10, write_fashion_idx, write_image_folder
from test_train import TINY_FASHION_MODEL, write_config


class _Payload:
    """Unpickling this object calls ``exec``: what a crafted CIFAR batch would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_crafted_cifar_batch_never_runs_code(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "data", per_batch=4)
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0, 1, 0, 1]}))
    with pytest.raises(UnsafeFileError, match=rf"{batch}.*builtins\.exec") as caught:
        cifar_dataset(root, num_classes=10, train=True)
    # Refused before any code ran, with one line naming the file.
    assert not marker.exists() and "\n" not in str(caught.value)
    assert isinstance(caught.value, GexError)


def test_cifar_batches_hold_only_what_the_official_files_hold(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "data", per_batch=4)
    folder = root / "cifar-10-batches-py"
    # A protocol-2 pickle with numpy's pre-2.0 module names, as the official Python 2 files are written.
    official = pickle.dumps({"data": np.full((4, 3072), 7, np.uint8), "labels": [3, 1, 4, 1]}, protocol=2)
    (folder / "data_batch_2").write_bytes(official.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    dataset = cifar_dataset(root, num_classes=10, train=True)
    assert dataset.data[4:8].min() == dataset.data[4:8].max() == 7 and dataset.targets[4:8] == [3, 1, 4, 1]
    # A well-formed pickle whose content is not a CIFAR batch (float pixels) is refused, naming the file.
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((4, 3072)), "labels": [0] * 4}))
    with pytest.raises(DataError, match=r"data_batch_2.*uint8"):
        cifar_dataset(root, num_classes=10, train=True)
    (folder / "data_batch_2").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match=r"data_batch_2"):
        cifar_dataset(root, num_classes=10, train=True)


# ---------------------------------------------------------------- every user error: one line, exit 2, before any work

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def _error_line(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    """The one stderr line of a refused command (Lightning's info lines excluded), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    root = write_fashion_idx(tmp_path / "data", train=48, test=16)
    return write_config(
        tmp_path / "config.yaml",
        model=TINY_FASHION_MODEL,
        data={"root": str(root), "dataset": "fashion_mnist", "batch_size": 12},
        epochs=1,
    )


BAD_ARGUMENTS = [
    (["--model.arch", "resnet5O"], "arch='resnet5O' is not a registered model (did you mean 'resnet50'"),
    (["--data.batch_size", "0"], "batch_size must be an int >= 1, got 0"),
    (["--data.batch_size", "-3"], "batch_size must be an int >= 1, got -3"),
    (["--model.lr", "-1"], "lr must be > 0, got -1.0"),
    (["--model.num_classes", "0"], "num_classes must be an int >= 1, got 0"),
    (["--model.in_chans", "0"], "in_chans must be an int >= 1, got 0"),
    (["--trainer.max_epochs", "-2"], "max_epochs` must be a non-negative integer or -1. You passed in -2"),
    (["--data.dataset", "cifar1O"], 'Parser key "data.dataset": Expected a typing.Literal'),
    (["--data.batch_size", "many"], "Parser key \"data.batch_size\": Expected a <class 'int'>. Got value: many"),
    # These were tracebacks (a review found them): a typo in arch_kwargs reached the backbone's constructor,
    # SGD and the loss checked their settings during the first step, and Lightning's name checks raise ValueError.
    (["--model.arch_kwargs", '{"widht": 4}'], "unexpected keyword argument 'widht'"),
    (["--model.arch_kwargs", '{"width": 0}'], "arch_kwargs {'width': 0} for cifar_resnet20: width must be an int >= 1"),
    (["--model.momentum", "-1"], "momentum and weight_decay must be >= 0, got -1.0 and 0.0"),
    (["--model.label_smoothing", "2"], "label_smoothing must be in [0, 1], got 2.0"),
    (["--trainer.accelerator", "tpuu"], "trainer: You selected an invalid accelerator name: `accelerator='tpuu'`"),
    (["--trainer.strategy", "bogus"], "trainer: You selected an invalid strategy name: `strategy='bogus'`"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["--trainer.accelerator", "gpu"], "No supported gpu backend found"))


@pytest.mark.parametrize(("arguments", "message"), BAD_ARGUMENTS, ids=lambda a: a[0] if isinstance(a, list) else "")
def test_bad_train_arguments_are_one_line_before_any_work(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert train_cli.main(["--config", str(tiny_config), "--out", str(out), *arguments]) == 2
    assert message in _error_line(capsys, "gex train")
    assert not out.exists()  # refused before the run folder was made


def test_a_yaml_config_with_python_tags_is_refused_unrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "tagged.yaml"
    config.write_text(f'model:\n  arch: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys, "gex train")
    assert f"--config {config}: not a plain YAML file" in line and "python/object/apply:os.system" in line
    assert not marker.exists()


def test_a_failed_download_is_one_line(tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no network torchvision raises a RuntimeError naming the URL it tried: it was a traceback."""
    from torchvision.datasets import FashionMNIST

    def offline(self: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2] Name unknown>")

    empty = tmp_path / "empty"
    argv = ["--config", str(tiny_config), "--data.root", str(empty), "--data.download", "true"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FashionMNIST, "download", offline)
        assert train_cli.main([*argv, "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys, "gex train")
    assert f"data path {str(empty)!r}: downloading Fashion-MNIST failed (Error downloading train-images" in line


def test_data_errors_suggest_the_commands_own_flags(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert (
        train_cli.main(["--config", str(tiny_config), "--out", str(tmp_path / "run"), "--data.root", str(missing)]) == 2
    )
    line = _error_line(capsys, "gex train")
    assert f"data path {str(missing)!r} does not exist" in line and "--data.download true" in line
    assert " --download" not in line  # gex compare's flag, which gex train does not have


def test_a_crafted_cifar_folder_stops_gex_train_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_cifar10(tmp_path / "data", per_batch=4)
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0, 1, 0, 1]}))
    config = write_config(
        tmp_path / "config.yaml",
        model={"arch": "cifar_resnet20", "arch_kwargs": {"width": 4}, "num_classes": 10, "input_size": 32},
        data={"root": str(root), "dataset": "cifar10", "batch_size": 4},
        epochs=1,
    )
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert f"CIFAR file {str(batch)!r} asks to call builtins.exec" in _error_line(capsys, "gex train")
    assert not marker.exists()


def test_a_corrupt_image_read_by_a_worker_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_image_folder(tmp_path / "data", per_class=4)
    broken = root / "train" / "b" / "b2.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    config = write_config(
        tmp_path / "config.yaml",
        model={"arch": "cifar_resnet20", "arch_kwargs": {"width": 4}, "num_classes": 2, "input_size": 16},
        data={"root": str(root), "dataset": "imagefolder", "batch_size": 8, "crop_size": 16, "num_workers": 1},
        epochs=1,
    )
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys, "gex train")
    assert line == f"gex train: error: corrupt or unreadable image file {str(broken)!r}: " + line.split(": ", 3)[3]


# ---------------------------------------------------------------- checkpoints that are not this project's, or unsafe


def _fake_checkpoint() -> dict[str, object]:
    return {"state_dict": {"net.fc.weight": torch.zeros(2, 2)}, "hyper_parameters": {"arch": "cifar_resnet20"}}


def test_checkpoint_errors_say_what_the_file_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truncated = tmp_path / "truncated.ckpt"
    torch.save(_fake_checkpoint(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert eval_cli.main([str(truncated), "--accelerator", "cpu"]) == 2
    assert f"checkpoint {str(truncated)!r} is incomplete or corrupt" in _error_line(capsys, "gex eval")

    weights = create_model("cifar_resnet20", width=4).state_dict()
    bare = tmp_path / "resnet.pth"
    torch.save(weights, bare)
    assert eval_cli.main([str(bare), "--accelerator", "cpu"]) == 2
    line = _error_line(capsys, "gex eval")
    assert (
        f"{str(bare)!r} is not a checkpoint of this project: it holds a bare state dict of {len(weights)} tensors"
        in line
    )
    assert "load such weights with gather_excite.create_model(NAME, pretrained=path)" in line

    marker = tmp_path / "pwned"
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({**_fake_checkpoint(), "extra": _Payload(marker)}, unsafe)
    assert eval_cli.main([str(unsafe), "--accelerator", "cpu"]) == 2
    assert f"checkpoint {str(unsafe)!r} was refused as unsafe" in _error_line(capsys, "gex eval")
    assert not marker.exists()


# What each file holds, and what reading it reports: bytes that torch.save never writes are a bad file
# (the legacy unpickler meets them as KeyError, EOFError, an unknown opcode ...), not a traceback;
# only a global outside the weights-only allowlist is "unsafe".
_NOT_TORCH_FILES = {
    "junk.ckpt": (b"junk\n", "is incomplete or corrupt"),  # 'j' reads as a memo lookup: KeyError
    "empty.ckpt": (b"", "is incomplete or corrupt"),  # EOFError
    "text.ckpt": (b"x = 1\n", "not a torch.save file (Unsupported operand 120)"),  # 'x' is no pickle opcode
    "plain.pkl": (pickle.dumps({"a": 1}, protocol=4), "not a torch.save file (Unsupported operand 149)"),  # FRAME
}


@pytest.mark.parametrize("name", sorted(_NOT_TORCH_FILES))
def test_a_file_torch_save_did_not_write_is_one_line_from_every_reader(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gather_excite.cli import detect as detect_cli

    content, expected = _NOT_TORCH_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    assert eval_cli.main([str(path), "--accelerator", "cpu"]) == 2
    line = _error_line(capsys, "gex eval")
    assert line.startswith(f"gex eval: error: checkpoint {str(path)!r} ") and expected in line, line
    assert detect_cli.main(["eval", str(path), "--accelerator", "cpu"]) == 2
    assert expected in _error_line(capsys, "gex detect eval")
    with pytest.raises(CheckpointError, match=f"pretrained={str(path)!r}.*{re.escape(expected)}") as caught:
        create_model("cifar_resnet20", pretrained=path, width=4)
    assert "\n" not in str(caught.value)


class _SystemPayload:
    """Unpickling this object calls ``os.system``: PyTorch words a global from a blocked module
    (``posix``) differently from one merely outside the allowlist (``exec`` above)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {str(self.marker)!r}",))


def test_an_unsafe_global_is_named_and_nothing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    for path in (tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt"):  # torch.save's zip and legacy formats
        torch.save({"x": _Payload(marker)}, path, _use_new_zipfile_serialization=path.stem == "zip")
        assert eval_cli.main([str(path), "--accelerator", "cpu"]) == 2
        line = _error_line(capsys, "gex eval")
        assert f"checkpoint {str(path)!r} was refused as unsafe" in line
        assert "(Unsupported global: GLOBAL exec was not an allowed global by default)" in line
    # A blocked module's function: still "unsafe", named, and none of PyTorch's advice to load it fully.
    system = tmp_path / "system.pth"
    torch.save({"w": torch.zeros(1), "x": _SystemPayload(marker)}, system)
    with pytest.raises(UnsafeFileError, match=r"refused as unsafe.*unsupported GLOBAL posix\.system") as caught:
        create_model("cifar_resnet20", pretrained=system, width=4)
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)
    assert eval_cli.main([str(system), "--accelerator", "cpu"]) == 2
    assert f"checkpoint {str(system)!r} was refused as unsafe" in _error_line(capsys, "gex eval")
    assert not marker.exists()


def test_a_json_file_that_is_not_json_is_one_line_from_every_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    from gather_excite.cli import analyze as analyze_cli
    from gather_excite.cli import compare as compare_cli
    from gather_excite.cli import export as export_cli

    broken = b'{"analysis": "prune", "ratios": [0.0, 0.25'  # a report cut off while copied
    report = tmp_path / "prune.json"
    report.write_bytes(broken)
    assert analyze_cli.main(["plot", str(report)]) == 2
    line = _error_line(capsys, "gex analyze plot")
    assert line.startswith(f"gex analyze plot: error: report {str(report)!r} is not a JSON file (")
    assert not report.with_suffix(".png").exists()

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_bytes(b"\xff\xfe not text")
    assert compare_cli.main(["--out", str(sweep), "--resume"]) == 2
    assert f"--out {str(sweep)!r}: its sweep.json is not a JSON file" in _error_line(capsys, "gex compare")

    folder = tmp_path / "exported"
    folder.mkdir()
    save_file(create_model("cifar_resnet20", width=4).state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_bytes(broken)
    with pytest.raises(DataError, match=rf"pretrained={re.escape(repr(str(folder)))}: config.json is not a JSON file"):
        create_model("cifar_resnet20", pretrained=folder, width=4)

    checkpoint = tmp_path / "last.ckpt"
    torch.save(_fake_checkpoint(), checkpoint)
    out = ["--format", "safetensors", "--out", str(tmp_path / "o"), "--eval-json", str(report)]
    assert export_cli.main([str(checkpoint), *out]) == 2
    assert f"--eval-json {str(report)!r} is not a JSON file" in _error_line(capsys, "gex export")


def test_a_checkpoint_never_names_code_to_import(tmp_path: Path) -> None:
    # LightningCLI saves `_class_path`/`_instantiator` beside the arguments; they are never imported.
    module = ClassificationModule("cifar_resnet20", arch_kwargs={"width": 4})
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {**module.hparams, "_instantiator": "os.system", "_class_path": "os.system"},
    }
    path = tmp_path / "named.ckpt"
    torch.save(checkpoint, path)
    loaded = load_model(path)
    assert type(loaded) is ClassificationModule and loaded.hparams["arch"] == "cifar_resnet20"
    assert torch.equal(loaded.net.fc.weight, module.net.fc.weight)


def _with_trainer(config: Path, trainer: dict[str, object] | str, path: Path) -> Path:
    """``config`` with ``trainer`` settings added, or its trainer group given as a file to read."""
    recipe = yaml.safe_load(config.read_text())
    if isinstance(trainer, str):
        recipe["trainer"] = trainer
    else:
        recipe["trainer"].update(trainer)
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_config_names_only_allowlisted_classes_and_no_function(
    tmp_path: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    # A handed folder with a module beside the config, importable here: importing it would run code.
    (tmp_path / "handed_callbacks.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport lightning\nclass Cb(lightning.pytorch.Callback):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    outside = [{"class_path": "handed_callbacks.Cb"}]
    config = _with_trainer(tiny_config, {"callbacks": outside}, tmp_path / "outside.yaml")
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert _error_line(capsys, "gex train") == (
        f"gex train: error: --config {config}: trainer.callbacks[0].class_path = 'handed_callbacks.Cb' is not a "
        "class a config may build (Lightning's callbacks, loggers, profilers, plugins and strategies); refused "
        "before importing it (a config a user was handed must not run code: build such a Trainer in Python)"
    )
    # A function by its import path: refused before its module is imported (importing it runs its top
    # level). LambdaCallback, which calls what it is given, is no class a config may build.
    (tmp_path / "handed_hooks.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef touch(*args):\n    open({str(marker)!r}, 'w').close()\n"
    )
    lambda_callback = "lightning.pytorch.callbacks.LambdaCallback"
    for hook_function in ("handed_hooks.touch", "torch.save"):
        hook = [{"class_path": lambda_callback, "init_args": {"on_fit_start": hook_function}}]
        config = _with_trainer(tiny_config, {"callbacks": hook}, tmp_path / "hook.yaml")
        assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
        assert f"trainer.callbacks[0].class_path = {lambda_callback!r} is not a class" in _error_line(
            capsys, "gex train"
        )
    config = _with_trainer(tiny_config, {"default_root_dir": "handed_hooks.touch"}, tmp_path / "value.yaml")
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "trainer.default_root_dir = 'handed_hooks.touch' names an import path outside" in _error_line(
        capsys, "gex train"
    )
    # A function or class that reached the parsed config anyhow is refused before anything is built.
    with pytest.raises(ConfigError, match=r"trainer.x = torch.serialization.save is a function"):
        check_parsed_config(Namespace(trainer=Namespace(x=torch.save)))
    # Every other way a YAML text reaches jsonargparse was imported before the check (a review found them):
    # a bare class path (no class_path key), a file the config names for a group, --trainer FILE, and a
    # command-line value.
    nested = tmp_path / "handed_trainer.yaml"
    nested.write_text(yaml.safe_dump({"callbacks": outside}))
    bare = _with_trainer(tiny_config, {"callbacks": ["handed_callbacks.Cb"]}, tmp_path / "bare.yaml")
    names_a_file = _with_trainer(tiny_config, str(nested), tmp_path / "names_a_file.yaml")
    for argv in (
        ["--config", str(bare)],
        ["--config", str(names_a_file)],
        ["--config", str(tiny_config), "--trainer", str(nested)],
        ["--config", str(tiny_config), "--trainer.logger", "handed_callbacks.Cb"],
    ):
        assert train_cli.main([*argv, "--out", str(tmp_path / "run")]) == 2, argv
        assert "handed_callbacks.Cb' is not a class a config may build" in _error_line(capsys, "gex train"), argv
    assert not marker.exists() and not (tmp_path / "run").exists()
    # Lightning's classes, by full or short name, are built as before.
    # (They reach the Trainer beside the run's own callbacks and checkpoint plugin.)
    allowed = [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}, {"class_path": "ModelSummary"}]
    double = {"class_path": "lightning.pytorch.plugins.precision.DoublePrecision"}
    csv = {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "run" / "mine")}}
    trainer_config = {"callbacks": allowed, "plugins": [double], "logger": csv}
    config = _with_trainer(tiny_config, trainer_config, tmp_path / "allowed.yaml")
    trainer = train_cli._parse(["--config", str(config), "--out", str(tmp_path / "run")]).trainer
    assert {"LearningRateMonitor", "ModelSummary", "ModelCheckpoint"} <= {type(c).__name__ for c in trainer.callbacks}
    assert type(trainer.precision_plugin).__name__ == "DoublePrecision"
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    mine = str(tmp_path / "run" / "mine")
    assert [(type(log).__name__, log.save_dir) for log in trainer.loggers] == [("CSVLogger", mine)]
    assert Path(trainer.log_dir).is_relative_to(tmp_path / "run")  # where the run's config.yaml is saved
    # No logger named: the run's own TensorBoard and CSV logs in --out.
    trainer = train_cli._parse(["--config", str(tiny_config), "--out", str(tmp_path / "run")]).trainer
    assert [type(log).__name__ for log in trainer.loggers] == ["TensorBoardLogger", "ResumableCSVLogger"]


# A class of an allowlisted package whose constructor starts a process: a config ran code with it (review).
GADGET = "torch.distributed.elastic.multiprocessing.subprocess_handler.SubprocessHandler"


def _gadget(marker: Path) -> dict[str, object]:
    start = {"entrypoint": sys.executable, "args": ["-c", f"open({str(marker)!r}, 'w').close()"], "env": {}}
    return {"class_path": GADGET, "init_args": {**start, "stdout": None, "stderr": None, "local_rank_id": 0,
                                                "numa_options": None}}  # fmt: skip


def test_a_config_builds_a_class_only_at_a_trainers_places(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker, run = tmp_path / "pwned", tmp_path / "run"
    gadget = {"x": _gadget(marker)}
    recipe = yaml.safe_load(tiny_config.read_text())
    recipe["model"]["arch_kwargs"] = gadget
    handed = tmp_path / "handed.yaml"
    handed.write_text(yaml.safe_dump(recipe))
    outer = tmp_path / "outer.yaml"  # a config that names the handed one (jsonargparse reads it as its part)
    outer.write_text(yaml.safe_dump({"config": handed.name}))
    where = f"model.arch_kwargs.x.class_path = {GADGET!r}: a config builds a class only for trainer.callbacks"
    for argv, source in (
        (["--config", str(handed)], f"--config {handed}"),
        (["--config", str(outer)], f"--config {handed}"),
        (["--config", str(tiny_config), "--model.arch_kwargs", json.dumps(gadget)], "--model.arch_kwargs"),
        (["--config", str(tiny_config), f"--model.arch_kwargs={json.dumps(gadget)}"], "--model.arch_kwargs"),
    ):
        assert train_cli.main([*argv, "--out", str(run)]) == 2, argv
        assert _error_line(capsys, "gex train").startswith(f"gex train: error: {source}: {where}"), argv
    # An allowlisted class is refused there too, and the gadget is refused at a Trainer's place.
    checkpoint = {"x": {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}}
    assert train_cli.main(["--config", str(tiny_config), "--model.arch_kwargs", json.dumps(checkpoint)]) == 2
    assert "model.arch_kwargs.x.class_path = 'lightning.pytorch.callbacks.ModelCheckpoint': a config builds" in (
        _error_line(capsys, "gex train")
    )
    config = _with_trainer(tiny_config, {"callbacks": [_gadget(marker)]}, tmp_path / "callback.yaml")
    assert train_cli.main(["--config", str(config), "--out", str(run)]) == 2
    assert f"trainer.callbacks[0].class_path = {GADGET!r} is not a class a config may build" in _error_line(
        capsys, "gex train"
    )
    # Timer is not on the list: jsonargparse cannot save its enum default with the run's config (a traceback).
    timer = "lightning.pytorch.callbacks.Timer"
    assert train_cli.main(["--config", str(tiny_config), f"--trainer.callbacks+={timer}", "--out", str(run)]) == 2
    assert f"{timer!r} is not a class a config may build" in _error_line(capsys, "gex train")
    # gex detect train's keyword arguments (the data are never read: refused while parsing).
    detector = {"model": {"backbone": "cifar_resnet20", "detector_kwargs": gadget},
                "data": {"root": str(tmp_path / "coco")}, "trainer": {"max_epochs": 0}}  # fmt: skip
    config = tmp_path / "detect.yaml"
    config.write_text(yaml.safe_dump(detector))
    assert detect_cli.main(["train", "--config", str(config), "--out", str(run)]) == 2
    line = _error_line(capsys, "gex detect train")
    assert f"--config {config}: model.detector_kwargs.x.class_path = {GADGET!r}: a config builds" in line
    time.sleep(1)  # the process the gadget would have started
    assert not marker.exists() and not run.exists()


def test_keyword_arguments_are_plain_json_that_jsonargparse_never_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Typed Any, a class_path in them was imported while parsing and built with the model (guard aside).
    marker = tmp_path / "imported"
    (tmp_path / "handed_gadget.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass G:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    value = {"x": {"class_path": "handed_gadget.G", "init_args": {"a": [1, {"b": None}]}}}
    arguments = [(ClassificationModule, "arch_kwargs", value), (DetectionModule, "backbone_kwargs", value),
                 (DetectionModule, "detector_kwargs", value), (DetectionModule, "categories", [value])]  # fmt: skip
    for module, key, given in arguments:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(module, "model")
        parsed = parser.parse_object({"model": {key: given}})
        assert parsed.model[key] == given and not isinstance(parsed.model[key], Namespace), key
    assert not marker.exists()


def test_a_config_writes_only_inside_out(tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim, run = tmp_path / "victim", tmp_path / "run"
    for name in ("checkpoints/last.ckpt", "csv/metrics.csv", "fit-notes.txt"):
        (victim / name).parent.mkdir(parents=True, exist_ok=True)
        (victim / name).write_text("ORIGINAL")
    before = _snapshot(victim)
    callback = "lightning.pytorch.callbacks.ModelCheckpoint"
    csv, profiler = "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.profilers.SimpleProfiler"
    cases = [
        ({"callbacks": [{"class_path": callback, "init_args": {"dirpath": str(victim / "checkpoints"),
                                                               "filename": "last", "every_n_train_steps": 1}}]},
         f"trainer.callbacks ModelCheckpoint's dirpath = {str(victim / 'checkpoints')!r} is outside --out {run}"),
        ({"callbacks": [{"class_path": callback, "init_args": {"filename": "../../victim/checkpoints/last",
                                                               "every_n_train_steps": 1}}]},
         "ModelCheckpoint's filename = '../../victim/checkpoints/last': a file name, not a path"),
        ({"logger": [{"class_path": csv, "init_args": {"save_dir": str(victim), "name": "", "version": "csv"}}]},
         f"trainer.logger CSVLogger's save_dir = {str(victim)!r} is outside --out {run}"),
        ({"logger": {"class_path": csv, "init_args": {"save_dir": str(run), "name": "../victim", "version": "csv"}}},
         f"trainer.logger CSVLogger's log_dir = {str(run / '../victim/csv')!r} is outside --out {run}"),
        ({"profiler": {"class_path": profiler, "init_args": {"dirpath": str(victim), "filename": "notes"}}},
         f"trainer.profiler SimpleProfiler's dirpath = {str(victim)!r} is outside --out {run}"),
    ]  # fmt: skip
    for trainer, message in cases:
        config = _with_trainer(tiny_config, trainer, tmp_path / "handed.yaml")
        assert train_cli.main(["--config", str(config), "--out", str(run), "--eval_after", "false"]) == 2, message
        assert message in _error_line(capsys, "gex train")
    assert _snapshot(victim) == before and not run.exists()


def test_a_resumed_checkpoint_never_removes_a_file_outside_its_run(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, run, victim = tmp_path / "base", tmp_path / "run", tmp_path / "victim"
    _train(tiny_config, base)
    (victim / "runs").mkdir(parents=True)
    (victim / "runs" / "eval.json").write_text("precious")
    # A weights-only checkpoint whose ModelCheckpoint states name the victim as the file they wrote last:
    # Lightning removed it (rm -r) as superseded after the next epoch.
    saved = torch.load(base / "checkpoints" / "last.ckpt", weights_only=True)
    for state in saved["callbacks"].values():
        state["best_model_path"] = f"{run}/checkpoints/" + "../" * 30 + str(victim).lstrip("/")
    handed = tmp_path / "model.ckpt"
    torch.save(saved, handed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tiny_config, run, "--resume", str(handed), "--trainer.max_epochs", "2")
    assert (victim / "runs" / "eval.json").is_file() and (victim / "runs" / "eval.json").read_text() == "precious"
    said = r"its ModelCheckpoint state names best_model_path .*victim.* not restored"
    assert any(re.search(said, str(warning.message)) for warning in caught)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # A config never chooses the checkpoint to restore: only the command line does.
    config = tmp_path / "handed.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(tiny_config.read_text()), "resume": str(handed)}))
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "other")]) == 2
    assert _error_line(capsys, "gex train") == (
        f"gex train: error: --config {config}: resume = {str(handed)!r}: a config does not choose the checkpoint "
        "a run continues from (it restores its optimizer and callbacks); pass --resume on the command line"
    )


def test_the_checkpoint_io_removes_only_a_checkpoint_file_of_its_run(tmp_path: Path) -> None:
    folder, victim = tmp_path / "run" / "checkpoints", tmp_path / "victim"
    folder.mkdir(parents=True)
    victim.mkdir()
    (victim / "eval.json").write_text("precious")
    (folder / "folder.ckpt").mkdir()
    (folder / "link.ckpt").symlink_to(victim / "eval.json")
    (victim / "outside.ckpt").write_bytes(b"another run's")
    checkpoint_io = AtomicCheckpointIO(tmp_path / "run")
    for path in (f"{folder}/../../victim", victim / "eval.json", victim / "outside.ckpt", folder / "folder.ckpt",
                 folder / "link.ckpt"):  # fmt: skip
        with pytest.warns(UserWarning, match="not removed as a superseded checkpoint"):
            checkpoint_io.remove_checkpoint(path)
    assert (victim / "eval.json").read_text() == "precious" and (victim / "outside.ckpt").is_file()
    assert (folder / "folder.ckpt").is_dir() and (folder / "link.ckpt").is_symlink()
    # A superseded checkpoint of the run's own callbacks, or of a config's ModelCheckpoint with a folder of
    # its own inside the run (Lightning's rule: its dirpath), is removed.
    (tmp_path / "run" / "topk").mkdir()
    for superseded in (folder / "epoch=0.ckpt", tmp_path / "run" / "topk" / "epoch=1.ckpt"):
        superseded.write_bytes(b"superseded")
        checkpoint_io.remove_checkpoint(superseded)
        assert not superseded.exists()


def test_a_handed_run_folder_with_a_link_out_of_it_is_refused(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, handed, victim = tmp_path / "base", tmp_path / "handed_run", tmp_path / "victim2" / "csv"
    _train(tiny_config, base)
    victim.mkdir(parents=True)
    rows = "epoch,step,val/top1_err\n0,10,40.0\n1,20,30.0\n2,30,20.0\n3,40,10.0\n"
    (victim / "metrics.csv").write_text(rows)
    handed.mkdir()
    shutil.copytree(base / "checkpoints", handed / "checkpoints")
    (handed / "csv").symlink_to("../victim2/csv")
    argv = ["--config", str(tiny_config), "--out", str(handed), "--resume", "last", "--trainer.max_epochs", "2"]
    assert train_cli.main(argv) == 2
    assert _error_line(capsys, "gex train") == (
        f"gex train: error: --out {handed}: {handed / 'csv'} is a link to {os.path.realpath(victim)}, outside the "
        "run folder; the run would write through it: remove the link or choose another --out (nothing was written)"
    )
    assert (victim / "metrics.csv").read_text() == rows
    # A link to a file of the run itself, and --out itself a link (one the user made), are fine.
    (handed / "csv").unlink()
    (handed / "checkpoints" / "latest.ckpt").symlink_to("last.ckpt")
    (tmp_path / "mine").symlink_to(handed)
    from gather_excite.cli._outputs import check_no_links_out  # (here: the test fails, not its module, without it)

    check_no_links_out(tmp_path / "mine")


# ---------------------------------------------------------------- nothing a user made is lost


def test_gex_eval_checks_out_before_the_work_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation started before --out was checked")

    monkeypatch.setattr(eval_cli, "load_for_evaluation", no_work)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    assert eval_cli.main(["model.ckpt", "--out", "reports"]) == 2
    assert "--out reports: is a folder; expected the path of a JSON file" in _error_line(capsys, "gex eval")
    (tmp_path / "a_file").write_text("x")
    assert eval_cli.main(["model.ckpt", "--out", "a_file/eval.json"]) == 2
    assert "a_file is a file" in _error_line(capsys, "gex eval")
    # The atomic writer itself removes its temporary file when the replace fails.
    with pytest.raises(IsADirectoryError):
        write_eval_json({"top1_err": 1.0}, tmp_path / "reports")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "reports"]
    assert list((tmp_path / "reports").iterdir()) == []


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _train(config: Path, out: Path, *extra: str) -> None:
    assert train_cli.main(["--config", str(config), "--out", str(out), "--eval_after", "false", *extra]) == 0


def test_a_resume_only_continues_its_own_run_and_a_failed_one_changes_nothing(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    _train(tiny_config, run_a)
    _train(tiny_config, run_b)
    before_a, before_b = _snapshot(run_a), _snapshot(run_b)
    assert "tensorboard/config.yaml" in before_b and "checkpoints/last.ckpt" in before_b
    foreign = str(run_a / "checkpoints" / "last.ckpt")

    # Another run's checkpoint into a folder that holds a run: refused.
    assert train_cli.main(["--config", str(tiny_config), "--out", str(run_b), "--resume", foreign]) == 2
    assert f"--resume {foreign}: the checkpoint belongs to another run" in _error_line(capsys, "gex train")
    # The run's own checkpoint with another model: refused before its config or logs are touched.
    mismatch = ["--resume", "last", "--model.arch", "se_cifar_resnet20", "--trainer.max_epochs", "2"]
    assert train_cli.main(["--config", str(tiny_config), "--out", str(run_b), *mismatch]) == 2
    assert "arch: checkpoint 'cifar_resnet20', this run 'se_cifar_resnet20'" in _error_line(capsys, "gex train")
    # An incomplete checkpoint: named, refused before any work.
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run_a / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    assert train_cli.main(["--config", str(tiny_config), "--out", str(tmp_path / "c"), "--resume", str(truncated)]) == 2
    assert f"checkpoint {str(truncated)!r} is incomplete or corrupt" in _error_line(capsys, "gex train")
    # Weights without optimizer and loop state (what gex compare writes): Lightning raised a KeyError
    # traceback after the new folder's logs were written.
    weights_only = tmp_path / "weights_only.ckpt"
    saved = torch.load(run_a / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({key: value for key, value in saved.items() if key not in ("optimizer_states", "loops")}, weights_only)
    resumed = ["--config", str(tiny_config), "--out", str(tmp_path / "c"), "--resume", str(weights_only)]
    assert train_cli.main(resumed) == 2
    assert "it holds weights only, no optimizer or loop state" in _error_line(capsys, "gex train")
    assert _snapshot(run_b) == before_b and not (tmp_path / "c").exists()
    # A run stopped before its first checkpoint leaves logs only: both ways in said something else was wrong
    # ("already holds a run; pass --resume last", then "no checkpoint to continue from").
    stopped = tmp_path / "stopped"
    (stopped / "tensorboard").mkdir(parents=True)
    (stopped / "tensorboard" / "config.yaml").write_text("seed_everything: 0\n")
    for resume in ([], ["--resume", "last"]):
        assert train_cli.main(["--config", str(tiny_config), "--out", str(stopped), *resume]) == 2
        line = _error_line(capsys, "gex train")
        assert "holds the logs of a run that stopped before its first checkpoint" in line, line
        assert f"choose another --out, or remove {stopped} to start again there" in line

    # Another run's checkpoint into a new folder continues it there, leaving the original alone.
    _train(tiny_config, tmp_path / "d", "--resume", foreign, "--trainer.max_epochs", "2")
    continued = torch.load(tmp_path / "d" / "checkpoints" / "last.ckpt", weights_only=True)
    assert continued["epoch"] == 1 and continued["global_step"] == 8  # 4 steps an epoch, epoch 2 of 2
    assert _snapshot(run_a) == before_a


def _hand_made_checkpoint(path: Path, data_root: Path) -> Path:
    """A checkpoint as gex train writes it (module arguments, weights, data arguments), without training."""
    module = ClassificationModule("cifar_resnet20", num_classes=10, in_chans=1, input_size=28, arch_kwargs={"width": 4})
    data = {"dataset": "fashion_mnist", "root": str(data_root), "batch_size": 8, "num_workers": 0}
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": data,
        },
        path,
    )
    return path


def test_no_command_writes_over_an_earlier_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output that exists is refused in one line before any work, --overwrite replaces it, and gex
    eval's default file steps to eval-2.json beside an earlier evaluation's eval.json."""
    from gather_excite.cli import detect as detect_cli
    from gather_excite.cli import export as export_cli

    checkpoint = _hand_made_checkpoint(tmp_path / "last.ckpt", write_fashion_idx(tmp_path / "data", train=8, test=8))
    earlier = tmp_path / "eval.json"
    earlier.write_text('{"top1_err": 12.5}\n')
    assert eval_cli.main([str(checkpoint), "--accelerator", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"-> {tmp_path / 'eval-2.json'}")
    assert json.loads((tmp_path / "eval-2.json").read_text())["num_images"] == 8
    assert eval_cli.main([str(checkpoint), "--accelerator", "cpu", "--out", str(earlier)]) == 2
    refused = f"--out {earlier}: the file exists (an earlier result); pass --overwrite to replace it"
    assert _error_line(capsys, "gex eval") == f"gex eval: error: {refused}"
    assert earlier.read_text() == '{"top1_err": 12.5}\n'
    assert eval_cli.main([str(checkpoint), "--accelerator", "cpu", "--out", str(earlier), "--overwrite"]) == 0
    assert json.loads(earlier.read_text())["num_images"] == 8

    graph = tmp_path / "model.pt2"
    graph.write_text("an earlier export")
    export = ["cifar_resnet20", "--format", "pt2", "--out", str(graph), "--image-size", "28"]
    assert export_cli.main(export) == 2
    assert f"--out {graph}: the file exists" in _error_line(capsys, "gex export")
    assert graph.read_text() == "an earlier export"
    assert export_cli.main([*export, "--overwrite"]) == 0 and zipfile.is_zipfile(graph)  # torch.export.save's zip
    capsys.readouterr()

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert export_cli.main([str(checkpoint), "--format", "safetensors", "--out", str(folder)]) == 2
    assert f"--out {folder}: the folder holds files (an earlier result)" in _error_line(capsys, "gex export")
    assert detect_cli.main(["data", "--out", str(folder)]) == 2
    assert f"--out {folder}: the folder holds files" in _error_line(capsys, "gex detect data")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_eval_and_analyze_errors_are_one_line_with_their_own_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gather_excite.cli import analyze as analyze_cli

    missing = tmp_path / "moved"
    checkpoint = _hand_made_checkpoint(tmp_path / "last.ckpt", missing)
    # The checkpoint names a data folder that is gone: gex eval's flag for another one is --data-root.
    assert eval_cli.main([str(checkpoint), "--accelerator", "cpu", "--out", str(tmp_path / "e.json")]) == 2
    line = _error_line(capsys, "gex eval")
    assert f"data path {str(missing)!r} does not exist" in line and "--data-root" in line
    assert "--data.download" not in line
    assert analyze_cli.main(["selectivity", str(checkpoint), "--out", str(tmp_path / "a")]) == 2
    assert "--data-root" in _error_line(capsys, "gex analyze selectivity")
    if not torch.cuda.is_available():
        root = write_fashion_idx(tmp_path / "data", train=16, test=8)
        gpu = ["--accelerator", "gpu", "--data-root", str(root)]
        assert eval_cli.main([str(checkpoint), *gpu, "--out", str(tmp_path / "e.json")]) == 2
        assert "gpu" in _error_line(capsys, "gex eval")
        assert analyze_cli.main(["prune", str(checkpoint), *gpu, "--out", str(tmp_path / "a")]) == 2
        assert "--accelerator gpu: no CUDA device is available" in _error_line(capsys, "gex analyze prune")
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "a").exists()


def test_the_gex_dispatcher_reports_a_user_error_any_command_let_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gather_excite import cli
    from gather_excite.cli import ops
    from gather_excite.errors import ConfigError

    def refuse(argv: list[str]) -> int:
        raise ConfigError("--channels must be >= 1, got 0")

    monkeypatch.setattr(ops, "main", refuse)
    assert cli.main(["ops", "--channels", "0"]) == 2
    assert _error_line(capsys, "gex ops") == "gex ops: error: --channels must be >= 1, got 0"

    def bug(argv: list[str]) -> int:
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(ops, "main", bug)
    with pytest.raises(ValueError, match="a bug"):  # keeps its traceback
        cli.main(["ops"])


def test_an_interrupted_safetensors_export_leaves_the_earlier_folder_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--overwrite replaced model.safetensors, then wrote config.json and README.md in place: a kill
    between them left new weights beside the earlier run's config and card (wrong figures). The folder
    is built beside --out and swapped in whole."""
    import safetensors.torch

    from gather_excite.cli import export as export_cli

    checkpoint = _hand_made_checkpoint(tmp_path / "last.ckpt", tmp_path / "data")
    out = tmp_path / "export"
    argv = [str(checkpoint), "--format", "safetensors", "--out", str(out), "--overwrite"]
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"checkpoint": str(checkpoint), "top1_err": 12.5}))
    assert export_cli.main([*argv, "--eval-json", str(report)]) == 0
    report.unlink()
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(earlier) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(earlier["config.json"])["eval"]["top1_err"] == 12.5

    save_file = safetensors.torch.save_file

    def killed_after_the_weights(*args: object, **kwargs: object) -> None:
        save_file(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed_after_the_weights)
    with torch.no_grad():  # other weights, so that the new model.safetensors differs from the earlier one
        saved = torch.load(checkpoint, weights_only=True)
        saved["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in saved["state_dict"].items()}
        torch.save(saved, checkpoint)
    with pytest.raises(KeyboardInterrupt):
        export_cli.main(argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "last.ckpt"]  # nothing left beside it

    monkeypatch.undo()
    assert export_cli.main(argv) == 0
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(now) == sorted(earlier) and now["model.safetensors"] != earlier["model.safetensors"]
    assert json.loads(now["config.json"])["eval"] == {}  # no figures: the earlier run's are not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "last.ckpt"]
    capsys.readouterr()

    # --overwrite replaces the folder whole: a folder holding anything else is refused, nothing removed.
    (out / "notes.txt").write_text("mine")
    assert export_cli.main(argv) == 2
    line = _error_line(capsys, "gex export")
    assert f"--out {out}: holds files that an export does not write (notes.txt)" in line
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").read_bytes() == now[
        "model.safetensors"
    ]


def test_an_output_folder_that_cannot_be_written_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing folder without write permission was a PermissionError traceback (only its parent was
    checked). chmod does not stop root, so the permission check itself is made to fail for that folder."""
    from gather_excite.cli import compare as compare_cli
    from gather_excite.cli import detect as detect_cli
    from gather_excite.cli import export as export_cli

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    missing = str(tmp_path / "no-data")  # were the check skipped, each command would stop at its data instead
    expected = f"--out {locked}: the folder is not writable"
    assert compare_cli.main(["--out", str(locked), "--data-root", missing, "--train-size", "8"]) == 2
    assert expected in _error_line(capsys, "gex compare")
    assert detect_cli.main(["data", "--out", str(locked), "--data-root", missing]) == 2
    assert expected in _error_line(capsys, "gex detect data")
    assert export_cli.main([str(tmp_path / "x.ckpt"), "--format", "safetensors", "--out", str(locked)]) == 2
    assert expected in _error_line(capsys, "gex export")
    # --overwrite builds the folder beside its place and swaps it in: the parent must be writable too.
    inside = locked / "export"
    inside.mkdir()
    argv = [str(tmp_path / "x.ckpt"), "--format", "safetensors", "--out", str(inside), "--overwrite"]
    assert export_cli.main(argv) == 2
    assert f"--out {inside}: the folder {locked} is not writable" in _error_line(capsys, "gex export")
    assert os.listdir(locked) == ["export"]


def test_a_config_checkpoint_callback_that_clashes_with_the_runs_own_is_one_line(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config's ModelCheckpoint with the settings of the run's own last-checkpoint callback (Lightning's
    defaults) is one line, before anything is written (it was Lightning's "more than one stateful
    callback" traceback at the Trainer's construction); one with its own schedule is accepted."""
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
    config = _with_trainer(tiny_config, {"callbacks": [callback]}, tmp_path / "handed.yaml")
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run"), "--eval_after", "false"]) == 2
    assert "a ModelCheckpoint with the settings of the run's own" in _error_line(capsys, "gex train")
    assert not (tmp_path / "run").exists()
    callback["init_args"] = {"every_n_train_steps": 2, "filename": "{step}"}
    config = _with_trainer(tiny_config, {"callbacks": [callback]}, tmp_path / "own.yaml")
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run"), "--eval_after", "false"]) == 0
    # 48 images in batches of 12: 4 steps, saved at steps 2 and 4 in the first logger's folder (where Lightning
    # places it); save_top_k=1 keeps the newest, so step 2's file was removed as superseded (inside the run).
    saved = sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("step=*"))
    assert saved == ["tensorboard/checkpoints/step=4.ckpt"]
