"""``gex train``: train a registered network from a YAML recipe with Lightning (CPU, GPU, multi-node DDP)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .._atomic import lock_folder
from ..configs import BASES, RECIPES, base_path, format_recipes
from ..data import ImageClassificationData
from ..engine import (
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    ClassificationModule,
    DiscardRedoneRows,
    ResumableCSVLogger,
    TrainSpeed,
    checkpoint_callbacks,
    evaluate,
    read_checkpoint,
    write_eval_json,
)
from ..errors import CheckpointError, ConfigError, DataNotFoundError, GexError, RunExistsError, one_line
from ._config_guard import check_command_line, check_config_file, check_parsed_config, install_loader
from ._outputs import check_inside, check_no_links_out, check_writable_folder

__all__ = ["GexCLI", "main"]


class RecipeConfigFile(ActionConfigFile):
    """``--config``: a YAML file, a packaged base recipe (``imagenet``) or a paper row's name.

    A row's name (``imagenet_ge_theta_resnet50``, see ``--list-recipes``) applies its base recipe
    and then sets ``model.arch``, exactly as ``--config imagenet --model.arch ge_theta_resnet50``,
    and a row's backbone arguments (Table 1's ``stages``), as its command's ``--model.arch_kwargs``.
    """

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:
        value = str(values)
        if Path(value).expanduser().is_file():
            check_config_file(value)  # names the file; every YAML text is checked again by the loader
            return super().__call__(parser, cfg, values, option_string)
        recipe = RECIPES.get(value.removesuffix(".yaml"))
        base = base_path(recipe.base if recipe is not None else value)
        if not base.is_file():
            known = ", ".join(BASES)
            raise ConfigError(
                f"--config {value}: no such file, base recipe or paper row (base recipes: {known}; "
                f"gex train --list-recipes names every row)"
            )
        super().__call__(parser, cfg, str(base), option_string)
        if recipe is not None:
            cfg["model.arch"] = recipe.arch
            if recipe.arch_kwargs:
                cfg["model.arch_kwargs"] = recipe.model_arch_kwargs()


class _ListRecipes(argparse.Action):
    """``--list-recipes``: print the paper rows with their commands and exit."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(format_recipes())
        parser.exit(0)


def _explain(error: Exception, parser: Any, argv: list[str]) -> str:
    """jsonargparse's message for a rejected argument, with the valid keys and close matches for an unknown one."""
    text = one_line(error)
    where = "the command line"
    if match := re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", text):
        group, key = match.groups()
        where = "the config"
    elif match := re.search(r"Option '(\w+)[\w.]*' is not accepted", text):
        group, key, where = "", match.group(1), "the config"
    elif match := re.search(r"unrecognized arguments: --([\w.-]+)", text):
        group, _, key = match.group(1).split("=")[0].rpartition(".")
        if "." in group:  # --model.arch_kwargs.width: the unknown key is the first level below the group
            group, key = group.split(".", 1)[0], group.split(".", 1)[1].split(".")[0]
    elif match := re.search(r"argument (\w+) --> ([\w.]+):", text):
        return f"--{match.group(2)} is set from --{match.group(1)}; pass --{match.group(1)} instead"
    elif "could not determine a constructor for the tag" in text:
        configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-c", "--config")]
        # yaml.safe_load builds plain data only: a Python tag lands here and never runs.
        return (
            f"--config {', '.join(configs) or '?'}: not a plain YAML file ({text}); tags such as !!python/object "
            f"are refused, since a config holds values only"
        )
    else:
        return text
    defaults = parser.get_defaults()
    scope = defaults.get(group) if group else defaults
    if group and scope is None:  # the group itself is unknown (--modle.lr): suggest among the top level
        group, key, scope = "", group.split(".")[0], defaults
    valid = [name for name in vars(scope) if not name.startswith("_")] if scope is not None else []
    if where == "the config":
        configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-c", "--config")]
        where = ", ".join(configs) or where
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    label = f"{group}.{key}" if group else key
    scope_name = f"'{group}'" if group else "the top level"
    return f"unknown config key {label!r} in {where}{hint}; valid keys of {scope_name}: {', '.join(valid)}"


class _SaveConfigAfterRestore(SaveConfigCallback):
    """Writes the run's ``config.yaml`` when training starts, after a resumed checkpoint is restored.

    Lightning's callback writes it at setup, before the checkpoint is read, so a resume that
    fails would already have replaced the run's config.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pass

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # The saved config starts the run again (gex train --config OUT/tensorboard/config.yaml --out NEW),
        # so it does not say where this invocation resumed from.
        if self.config.get("resume") is not None:
            self.config = self.config.clone()
            self.config["resume"] = None
        super().setup(trainer, pl_module, "fit")


class GexCLI(LightningCLI):
    """LightningCLI with ``--out`` (run folder: checkpoints, logs, eval.json), ``--resume`` and the recipe table.

    ``best.ckpt`` keeps the best ``monitor`` value (``monitor_mode``: ``"min"`` or ``"max"``);
    ``last_on_train_epoch_end`` writes ``last.ckpt`` after each training epoch instead of after
    each validation (see :func:`~gather_excite.engine.checkpoint_callbacks`).
    """

    monitor: str | None = "val/top1_err"
    monitor_mode: str = "min"
    last_on_train_epoch_end: bool = False

    def init_parser(self, **kwargs: Any) -> Any:
        parser = self.parser_class(**kwargs)
        parser.add_argument(
            "-c", "--config", action=RecipeConfigFile, help="a YAML file, a base recipe or a paper row (--list-recipes)"
        )
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--list-recipes", action=_ListRecipes, nargs=0, help="print the paper's rows with their commands and exit"
        )
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
        # Lightning's own files (e.g. lightning_logs/) go into the run folder too.
        parser.link_arguments("out", "trainer.default_root_dir")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(_explain(err, parser, list(args or []))) from None

    def before_instantiate_classes(self) -> None:
        check_parsed_config(self.config)  # the file's and the command line's, before anything is built

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        out = Path(self.config["out"])
        # The config's own callbacks, plugins and logger (trainer.callbacks/plugins/logger) are kept:
        # Lightning merges the trainer config with these kwargs, so passing ours alone would drop them.
        configured = self.config_init.get("trainer") or {}
        callbacks = _as_list(kwargs.pop("callbacks", None) or configured.get("callbacks"))
        callbacks += [
            *checkpoint_callbacks(
                out / "checkpoints",
                monitor=self.monitor,
                mode=self.monitor_mode,
                last_on_train_epoch_end=self.last_on_train_epoch_end,
            ),
            TrainSpeed(),
            DiscardRedoneRows(),
        ]
        if kwargs.get("logger", configured.get("logger")) in (None, True):  # no logger named: the run's own
            kwargs["logger"] = [
                TensorBoardLogger(str(out), name="", version="tensorboard", default_hp_metric=False),
                ResumableCSVLogger(str(out), name="", version="csv"),
            ]
        _check_checkpoint_states(callbacks)
        plugins = _as_list(kwargs.pop("plugins", None) or configured.get("plugins"))
        plugins.append(AtomicCheckpointIO(out))
        try:
            trainer = super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)
        # Lightning's words for an unknown accelerator, strategy or precision name (ValueError) and for one
        # this machine cannot honour (MisconfigurationException, e.g. accelerator gpu without one)
        except (ValueError, MisconfigurationException) as err:
            raise ConfigError(f"trainer: {one_line(err)}") from None
        _check_writes_inside(trainer, out)
        _check_processes(trainer, sync_batchnorm=bool((self.config.get("trainer") or {}).get("sync_batchnorm")))
        return trainer


def _check_checkpoint_states(callbacks: list[Any]) -> None:
    """Lightning keeps one checkpointed state per ModelCheckpoint setting (its ``state_key``): a config's
    ModelCheckpoint with the settings of one of the run's own raised Lightning's traceback."""
    seen: set[str] = set()
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.state_key in seen:
                raise ConfigError(
                    f"trainer.callbacks: a ModelCheckpoint with the settings of the run's own ({callback.state_key}); "
                    "the run already keeps last.ckpt and best.ckpt in OUT/checkpoints: give yours another monitor "
                    "or every_n_epochs/every_n_train_steps"
                )
            seen.add(callback.state_key)


def _check_writes_inside(trainer: Any, out: Path) -> None:
    """Refuse, before anything is written, a config-built logger, ModelCheckpoint or profiler that would write
    outside ``out``: a handed config overwrote another run's ``last.ckpt`` and ``metrics.csv`` that way. The
    first logger's folder also receives the saved ``config.yaml``. A file name must be a name, not a path."""
    check_no_links_out(out)  # first, to name the link rather than the logger writing through it
    check_inside(trainer.default_root_dir, out, "trainer.default_root_dir")
    for logger in trainer.loggers:
        for key in ("save_dir", "log_dir"):
            if getattr(logger, key, None) is not None:
                check_inside(getattr(logger, key), out, f"trainer.logger {type(logger).__name__}'s {key}")
    writers = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)] + [trainer.profiler]
    for writer in writers:
        what = f"trainer.{'profiler' if writer is trainer.profiler else 'callbacks'} {type(writer).__name__}'s"
        if getattr(writer, "dirpath", None) is not None:
            check_inside(writer.dirpath, out, f"{what} dirpath")
        filename = getattr(writer, "filename", None)
        if filename and ("/" in filename or os.sep in filename):
            raise ConfigError(f"{what} filename = {filename!r}: a file name, not a path (the folder is dirpath)")


def _check_processes(trainer: Any, *, sync_batchnorm: bool) -> None:
    """Refuse, before any process starts, what DDP would otherwise raise as a traceback on every rank."""
    strategy = trainer.strategy
    if not isinstance(strategy, ParallelStrategy):
        started = int(os.environ.get("WORLD_SIZE", "1")) if TorchElasticEnvironment.detect() else 1
        if started > 1:  # each of torchrun's processes would train a model of its own into the same --out
            raise ConfigError(
                f"trainer: torchrun started {started} processes, but the trainer runs on one device; set "
                f"--trainer.devices and --trainer.num_nodes so that devices x nodes = {started}"
            )
        return
    environment = strategy.cluster_environment
    if environment is not None:
        try:  # torchrun/SLURM started the processes: their number must be nodes x devices
            environment.validate_settings(num_devices=len(strategy.parallel_devices or []), num_nodes=trainer.num_nodes)
        except ValueError as err:
            raise ConfigError(f"trainer: {one_line(err)}") from None
    if sync_batchnorm and strategy.root_device.type == "cpu":
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm does not run on CPU processes "
            "(set --trainer.sync_batchnorm false, or train on GPUs)"
        )


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def _run_files(out: Path) -> list[Path]:
    """The files by which ``out`` holds a run: checkpoints, the CSV log, the saved config, the evaluation."""
    files = sorted((out / "checkpoints").glob("*.ckpt"))
    candidates = (out / "csv" / "metrics.csv", out / "tensorboard" / "config.yaml", out / "eval.json")
    return files + [path for path in candidates if path.is_file()]


def saved_last(out: Path) -> str | None:
    """The run's ``last.ckpt`` that the final evaluation describes, or ``None`` where none was written
    (``--trainer.max_epochs 0``: the evaluation is then of the initial weights, and says so)."""
    last = out / "checkpoints" / LAST_CHECKPOINT
    return str(last) if last.is_file() else None


def _resume_path(resume: str | None, out: Path) -> str | None:
    """The checkpoint to continue from, after checking that no other run's files would be overwritten."""
    existing = _run_files(out)
    own = out / "checkpoints" / LAST_CHECKPOINT
    # A run stopped before its first checkpoint leaves only logs: there is nothing to continue, and
    # starting again there would write over them, so say which folder to choose or remove.
    unfinished = (
        f"--out {out} holds the logs of a run that stopped before its first checkpoint ({existing[0]}), so there "
        f"is nothing to continue: choose another --out, or remove {out} to start again there (nothing was "
        "overwritten)"
        if existing and not any(path.suffix == ".ckpt" for path in existing)
        else None
    )
    if resume is None:
        if existing:
            raise RunExistsError(
                unfinished
                or f"--out {out} already holds a run ({existing[0]}); pass --resume last to continue it, "
                f"or choose another --out (nothing was overwritten)"
            )
        return None
    path = own if resume in ("last", "auto", "true") else Path(resume)
    if not path.is_file():
        if unfinished and path == own:
            raise CheckpointError(f"--resume {resume}: {unfinished}")
        raise CheckpointError(f"--resume {resume}: no checkpoint at {str(path)!r} to continue from")
    if path.resolve().parent != (out / "checkpoints").resolve() and existing:
        raise RunExistsError(
            f"--resume {resume}: the checkpoint belongs to another run than --out {out}, which holds its own "
            f"({existing[0]}); continuing there would overwrite it. Pass --resume last to continue {out}, or a "
            f"new --out to continue {resume} in a folder of its own (nothing was overwritten)"
        )
    return str(path)


def _check_resumable(path: str, model: ClassificationModule) -> int:
    """Read the checkpoint now (weights-only) so that an unreadable one, another model's, or one without the
    optimizer and loop state that continuing needs (a ``gex compare`` run's) fails before any work; returns
    the training step it was saved at."""
    try:
        saved = read_checkpoint(path)
        model.check_checkpoint(saved)
    except CheckpointError as err:
        raise CheckpointError(f"--resume {path}: {err}") from None
    require_training_state(saved, path, "a gex compare run's, or one saved with save_weights_only",
                           f"; start a new run from its weights with --model.pretrained {path}")  # fmt: skip
    # The optimizer's parameter groups follow these settings; torch refuses a state of other groups.
    saved_hp, keys = saved.get("hyper_parameters", {}), ("norm_weight_decay", "bias_weight_decay")
    differing = [f"{k} {saved_hp.get(k)} (this run {model.hparams.get(k)})" for k in keys
                 if saved_hp.get(k) != model.hparams.get(k)]  # fmt: skip
    if differing:
        settings = " ".join(f"--model.{k} {'null' if saved_hp.get(k) is None else saved_hp.get(k)}" for k in keys)
        raise CheckpointError(
            f"--resume {path}: the checkpoint's run had {', '.join(differing)}, which splits the optimizer's "
            f"parameters into other groups; continue it with its own settings: {settings}"
        )
    return int(saved.get("global_step", -1))


def require_training_state(saved: dict[str, Any], path: str, origin: str, advice: str = "") -> None:
    """Refuse a checkpoint without the optimizer and loop state that continuing a run needs."""
    if not all(key in saved for key in ("optimizer_states", "loops")):
        raise CheckpointError(
            f"--resume {path}: it holds weights only, no optimizer or loop state ({origin}), so no run can "
            f"continue from it{advice}"
        )


def finished_before(cli: Any, out: Path, resumed_step: int | None, command: str) -> bool:
    """Whether ``--resume`` continued a run that had finished its epochs (nothing trained, its ``eval.json``
    is there), said on stdout: evaluating it again would only log its test row a second time."""
    if resumed_step is None or resumed_step != cli.trainer.global_step or not (out / "eval.json").is_file():
        return False
    if cli.trainer.is_global_zero:
        done = f"the run in {out} had finished its {cli.trainer.max_epochs} epochs"
        print(f"{command}: {done}; nothing to continue ({out / 'eval.json'} is unchanged; raise "
              "--trainer.max_epochs to train on)")  # fmt: skip
    return True


def _check_model_matches_data(model: ClassificationModule, data: ImageClassificationData) -> None:
    expected = {"num_classes": data.num_classes, "in_chans": data.in_chans}
    differences = [
        f"model.{key}={model.hparams[key]} but the data has {value}"
        for key, value in expected.items()
        if model.hparams[key] != value
    ]
    if differences:
        raise ConfigError("model and data disagree: " + "; ".join(differences))


TRAIN_DESCRIPTION = (
    "Train a classification network from a YAML recipe (--config; --list-recipes names the paper's rows), "
    "then evaluate it into OUT/eval.json."
)


def _parse(
    argv: list[str],
    *,
    cli_class: type[GexCLI] = GexCLI,
    model_class: type = ClassificationModule,
    data_class: type = ImageClassificationData,
    prog: str = "gex train",
    description: str = TRAIN_DESCRIPTION,
) -> GexCLI:
    """The parsed config with the model, data and trainer built (nothing run yet)."""
    install_loader()  # every YAML text read below is checked for class paths before anything is imported
    check_command_line(argv)  # with each option's key path: a class is built only at a Trainer's places
    saved_argv, sys.argv = sys.argv, [prog]  # LightningCLI warns when sys.argv and args differ
    # "Seed set to N" would precede a one-line error about the arguments; the seed is in the config.
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        return cli_class(
            model_class,
            data_class,
            run=False,
            args=argv,
            subclass_mode_model=False,
            subclass_mode_data=False,
            auto_configure_optimizers=False,
            seed_everything_default=0,  # a recipe's seed_everything overrides it; Lightning's default warns
            save_config_callback=_SaveConfigAfterRestore,
            save_config_kwargs={"overwrite": True},
            # exit_on_error=False: what jsonargparse rejects raises (GexCLI.parse_arguments words it as one line).
            parser_kwargs={
                "prog": prog,
                "description": description,  # Lightning's default is "Lightning Trainer command line tool"
                "default_env": False,
                "allow_abbrev": False,
                "exit_on_error": False,
            },
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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_held(_parse(argv), "gex train", _train)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    # Lightning's own type for a Trainer setting it cannot honour (e.g. --trainer.accelerator gpu without one).
    except (GexError, MisconfigurationException) as err:
        hint = _DATA_HINT if isinstance(err, DataNotFoundError) else ""
        print(f"gex train: error: {one_line(err)}{hint}", file=sys.stderr)
        return 2


def _train(cli: GexCLI, out: Path) -> int:
    """Fit, then evaluate the final weights into ``out/eval.json`` (``main`` reports what goes wrong)."""
    ckpt_path = _resume_path(cli.config["resume"], out)
    resumed_step = _check_resumable(ckpt_path, cli.model) if ckpt_path is not None else None
    _check_model_matches_data(cli.model, cli.datamodule)
    # Before the processes start (they would each print it, after setting up the process group).
    for train in (True, False):
        cli.datamodule.per_device_batch_size(train=train, world_size=cli.trainer.world_size)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    if finished_before(cli, out, resumed_step, "gex train"):
        pass
    elif cli.config["eval_after"] and not cli.trainer.interrupted:
        # Every process takes part (torchmetrics syncs the counts); rank 0 writes the file.
        result = evaluate(cli.model, cli.datamodule, trainer=cli.trainer, checkpoint=saved_last(out))
        if cli.trainer.is_global_zero:
            path = write_eval_json(result, out / "eval.json")
            print(f"top-1 error {result['top1_err']:.2f}%  top-5 error {result['top5_err']:.2f}%  -> {path}")
    return 0


@contextlib.contextmanager
def held_run_folder(out: Path, trainer: Any, command: str) -> Iterator[None]:
    """Check the run folder ``out`` and hold it while the run writes into it (the first process of a DDP
    run; the others start inside its hold): a second ``gex train`` or ``gex detect train`` into it (a
    resubmitted job while the first still runs) is refused in one line instead of mixing two runs' logs
    and checkpoints. A folder made only for the hold is removed again when the run fails before writing."""
    if os.path.lexists(out) and not out.is_dir():
        what = "a broken link" if out.is_symlink() else "a file"
        raise ConfigError(f"--out {out}: is {what}; expected a run folder (new, or the one to resume)")
    check_writable_folder(out)
    check_no_links_out(out)  # a handed run folder's csv -> ../other/csv would rewrite that run's log
    lock, made = None, []
    if trainer.global_rank == 0:
        made = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
        busy = f"--out {out}: another {command} is writing into this folder now; wait for it to end (or stop it)"
        lock = lock_folder(out, busy + ", then continue it with --resume last")
    try:
        yield
    except BaseException:
        for folder in made:  # only empty folders, made for this run: a run that wrote nothing
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        if lock is not None:
            os.close(lock)


def run_held(cli: Any, command: str, run: Callable[[Any, Path], int]) -> int:
    """``run(cli, out)`` in its held run folder (:func:`held_run_folder`); a run stopped by SIGTERM is
    said so and exits 143 (Lightning ends it with status 0: a pre-empted job must not look finished)."""
    out = Path(cli.config["out"])
    try:
        with held_run_folder(out, cli.trainer, command):
            return run(cli, out)
    except SIGTERMException:
        last = out / "checkpoints" / LAST_CHECKPOINT
        resume = f"continue it with --resume last ({last})" if last.is_file() else "no checkpoint yet"
        print(f"{command}: stopped by SIGTERM before the run finished; {resume}", file=sys.stderr)
        return 143
