"""``gex train``: train a registered network from a YAML recipe with Lightning (CPU, GPU, multi-node DDP)."""

from __future__ import annotations

import difflib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from ..data import ImageClassificationData
from ..engine import (
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    ClassificationModule,
    DiscardRedoneRows,
    ResumableCSVLogger,
    TrainSpeed,
    checkpoint_callbacks,
    describe_model_mismatch,
    evaluate,
    read_checkpoint,
    write_eval_json,
)
from ..errors import CheckpointError, ConfigError, DataNotFoundError, GexError, RunExistsError, one_line

__all__ = ["GexCLI", "check_config_keys", "config_dir", "main", "resolve_config_names"]


def config_dir() -> Path:
    """The folder of the packaged recipes (``gather_excite/configs``)."""
    return Path(__file__).resolve().parent.parent / "configs"


def resolve_config_names(argv: list[str]) -> list[str]:
    """Replace ``--config NAME`` by the packaged recipe ``configs/NAME.yaml`` when NAME is not a file."""
    resolved = list(argv)
    for index, arg in enumerate(resolved):
        value, prefix = None, ""
        if arg == "--config" and index + 1 < len(resolved):
            value, target = resolved[index + 1], index + 1
        elif arg.startswith("--config="):
            value, target, prefix = arg.split("=", 1)[1], index, "--config="
        if value is None or Path(value).exists():
            continue
        packaged = config_dir() / (value if value.endswith(".yaml") else f"{value}.yaml")
        if packaged.is_file():
            resolved[target] = prefix + str(packaged)
    return resolved


def _valid_keys() -> dict[str, list[str]]:
    """The accepted keys of each config group, from the signatures that LightningCLI reads."""
    import lightning as L

    def names(fn: Any) -> list[str]:
        return [name for name in inspect.signature(fn).parameters if name not in ("self", "args", "kwargs")]

    return {
        "model": names(ClassificationModule.__init__),
        "data": names(ImageClassificationData.__init__),
        "trainer": names(L.Trainer.__init__),
        "": ["config", "print_config", "seed_everything", "model", "data", "trainer", "out", "resume", "eval_after"],
    }


def _unknown_key_message(key: str, group: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    label = f"{group}.{key}" if group else key
    scope = f"'{group}'" if group else "the top level"
    return f"unknown config key {label!r} in {where}{hint}; valid keys of {scope}: {', '.join(valid)}"


def check_config_keys(argv: list[str]) -> None:
    """Raise ``ValueError`` naming an unknown key (and the valid ones) of a YAML config or an override."""
    valid = _valid_keys()
    for index, arg in enumerate(argv):
        value = None
        if arg == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            path = Path(value)
            if not path.is_file():
                raise ConfigError(
                    f"--config {value}: no such file and no packaged recipe of that name "
                    f"(recipes: {', '.join(sorted(p.stem for p in config_dir().glob('*.yaml')))})"
                )
            try:
                with open(path) as handle:
                    loaded = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                # safe_load builds plain data only: a Python tag (!!python/object...) lands here, never runs.
                raise ConfigError(
                    f"--config {value}: not a plain YAML file ({one_line(err)}); tags such as !!python/object are "
                    f"refused, since a config holds values only"
                ) from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"--config {value}: expected a YAML mapping, got {type(loaded).__name__}")
            for key, section in loaded.items():
                if key not in valid[""]:
                    raise ConfigError(_unknown_key_message(key, "", valid[""], str(path)))
                if key in ("model", "data", "trainer") and isinstance(section, dict):
                    for sub in section:
                        if sub not in valid[key]:
                            raise ConfigError(_unknown_key_message(sub, key, valid[key], str(path)))
        elif arg.startswith("--") and "." in arg:
            group, _, key = arg[2:].split("=", 1)[0].partition(".")
            key = key.split(".", 1)[0]
            if group in ("model", "data", "trainer") and key not in valid[group]:
                raise ConfigError(_unknown_key_message(key, group, valid[group], "the command line"))


class _SaveConfigAfterRestore(SaveConfigCallback):
    """Writes the run's ``config.yaml`` when training starts, after a resumed checkpoint is restored.

    Lightning's callback writes it at setup, before the checkpoint is read, so a resume that
    fails would already have replaced the run's config.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pass

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().setup(trainer, pl_module, "fit")


class GexCLI(LightningCLI):
    """LightningCLI with ``--out`` (run folder: checkpoints, logs, eval.json) and ``--resume``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--out", type=str, default="runs/train", help="run folder: checkpoints, logs, eval.json")
        parser.add_argument(
            "--resume",
            type=str | None,
            default=None,
            help="continue a run: 'last' (OUT/checkpoints/last.ckpt) or a checkpoint path",
        )
        parser.add_argument(
            "--eval_after", type=bool, default=True, help="evaluate the final weights and write OUT/eval.json"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config
        out = Path(config["out"])
        trainer = config["trainer"]
        if trainer.get("default_root_dir") is None:
            trainer["default_root_dir"] = str(out)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        out = Path(self.config["out"])
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [*checkpoint_callbacks(out / "checkpoints"), TrainSpeed(), DiscardRedoneRows()]
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = [
                TensorBoardLogger(str(out), name="", version="tensorboard", default_hp_metric=False),
                ResumableCSVLogger(str(out), name="", version="csv"),
            ]
        plugins = kwargs.pop("plugins", None) or []
        plugins = [plugins] if not isinstance(plugins, list) else list(plugins)
        plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)


def _run_files(out: Path) -> list[Path]:
    """The files by which ``out`` holds a run: checkpoints, the CSV log, the saved config, the evaluation."""
    files = sorted((out / "checkpoints").glob("*.ckpt"))
    candidates = (out / "csv" / "metrics.csv", out / "tensorboard" / "config.yaml", out / "eval.json")
    return files + [path for path in candidates if path.is_file()]


def _resume_path(resume: str | None, out: Path) -> str | None:
    """The checkpoint to continue from, after checking that no other run's files would be overwritten."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a run folder (new, or the one to resume)")
    existing = _run_files(out)
    own = out / "checkpoints" / LAST_CHECKPOINT
    if resume is None:
        if existing:
            raise RunExistsError(
                f"--out {out} already holds a run ({existing[0]}); pass --resume last to continue it, "
                f"or choose another --out (nothing was overwritten)"
            )
        return None
    path = own if resume in ("last", "auto", "true") else Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no checkpoint at {str(path)!r} to continue from")
    if path.resolve().parent != (out / "checkpoints").resolve() and existing:
        raise RunExistsError(
            f"--resume {resume}: the checkpoint belongs to another run than --out {out}, which holds its own "
            f"({existing[0]}); continuing there would overwrite it. Pass --resume last to continue {out}, or a "
            f"new --out to continue {resume} in a folder of its own (nothing was overwritten)"
        )
    return str(path)


def _check_resumable(path: str, model: ClassificationModule) -> None:
    """Read the checkpoint now (weights-only) so that an unreadable one or another model's fails before any work."""
    saved = read_checkpoint(path)
    differences = describe_model_mismatch(saved["hyper_parameters"], dict(model.hparams))
    if differences:
        raise CheckpointError(
            f"--resume {path}: checkpoint was saved for a different model; it differs in "
            + "; ".join(differences)
            + ". Resume with the checkpoint's model settings or start a new run (another --out)"
        )


def _check_model_matches_data(model: ClassificationModule, data: ImageClassificationData) -> None:
    expected = {"num_classes": data.num_classes, "in_chans": data.in_chans}
    differences = [
        f"model.{key}={model.hparams[key]} but the data has {value}"
        for key, value in expected.items()
        if model.hparams[key] != value
    ]
    if differences:
        raise ConfigError("model and data disagree: " + "; ".join(differences))


def _parse(argv: list[str]) -> GexCLI:
    """The parsed config with the model, data and trainer built (nothing run yet)."""
    saved_argv, sys.argv = sys.argv, ["gex train"]  # LightningCLI warns when sys.argv and args differ
    # "Seed set to N" would precede a one-line error about the arguments; the seed is in the config.
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        return GexCLI(
            ClassificationModule,
            ImageClassificationData,
            run=False,
            args=argv,
            subclass_mode_model=False,
            subclass_mode_data=False,
            auto_configure_optimizers=False,
            save_config_callback=_SaveConfigAfterRestore,
            save_config_kwargs={"overwrite": True},
            # exit_on_error=False: a value jsonargparse rejects raises, to be reported as one line.
            parser_kwargs={"prog": "gex train", "default_env": False, "allow_abbrev": False, "exit_on_error": False},
        )
    finally:
        sys.argv = saved_argv  # the DDP launcher starts the other processes with sys.argv
        seed_log.setLevel(level)


_DATA_HINT = " [gex train: set --data.root to the data folder, or --data.download true to fetch CIFAR/Fashion-MNIST]"


def main(argv: list[str] | None = None) -> int:
    """Parse the config and overrides, train, then evaluate the final weights into OUT/eval.json.

    A mistake in the arguments, the config, the data or the checkpoint ends with one line on
    stderr and exit status 2, before any training where it can be seen beforehand.
    """
    argv = resolve_config_names(list(sys.argv[1:] if argv is None else argv))
    try:
        check_config_keys(argv)
        cli = _parse(argv)
        out = Path(cli.config["out"])
        ckpt_path = _resume_path(cli.config["resume"], out)
        if ckpt_path is not None:
            _check_resumable(ckpt_path, cli.model)
        _check_model_matches_data(cli.model, cli.datamodule)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
        if cli.config["eval_after"] and not cli.trainer.interrupted:
            # Every process takes part (torchmetrics syncs the counts); rank 0 writes the file.
            last = str(out / "checkpoints" / LAST_CHECKPOINT)
            result = evaluate(cli.model, cli.datamodule, trainer=cli.trainer, checkpoint=last)
            if cli.trainer.is_global_zero:
                path = write_eval_json(result, out / "eval.json")
                print(f"top-1 error {result['top1_err']:.2f}%  top-5 error {result['top5_err']:.2f}%  -> {path}")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    # Lightning's own type for a Trainer setting it cannot honour (e.g. --trainer.accelerator gpu without one);
    # jsonargparse's for a value of the wrong type or outside its choices.
    except (GexError, MisconfigurationException, ArgumentError) as err:
        hint = _DATA_HINT if isinstance(err, DataNotFoundError) else ""
        print(f"gex train: error: {one_line(err)}{hint}", file=sys.stderr)
        return 2
    return 0
