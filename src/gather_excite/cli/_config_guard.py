"""What a ``gex train``/``gex detect train`` config may name: a few Lightning classes, each only where a
Trainer takes such an object, and no function. LightningCLI builds ``trainer.callbacks``/``logger``/
``plugins``/``strategy``/``profiler`` from a class path (importing its module while parsing:
``class_path: pkg.Cls``, or the bare string ``pkg.Cls``), builds a ``class_path`` it finds in any
argument typed ``Any`` (a gadget class whose constructor starts a process ran that way, from
``model.arch_kwargs``), and imports a dotted path given for a callable argument
(``LambdaCallback(on_fit_start=...)``).

So a ``class_path`` must name one of :data:`ALLOWED_CLASSES` (exact import paths, not packages) and
stand at one of the Trainer's places (:data:`OBJECT_PLACES`); anywhere else it is refused. Every YAML
text jsonargparse reads goes through one loader (:func:`install_loader`): the ``--config`` file, a file
it names (``config: other.yaml``, ``trainer: other.yaml``), a file given as ``--trainer FILE`` and each
command-line value. The loader does not know where its text goes, so it refuses a class outside the
allowlist before jsonargparse can import it; the ``--config`` file (with the files its ``config:`` key
names) and the command line are checked with their key paths before parsing
(:func:`check_config_file`, :func:`check_command_line`), and the parsed config, whatever route its
values took, before anything in it is built or called (:func:`check_parsed_config`)."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace, get_loader, set_loader
from jsonargparse.typing import get_import_path, import_object

from ..errors import ConfigError

__all__ = [
    "ALLOWED_CLASSES",
    "OBJECT_PLACES",
    "check_command_line",
    "check_config_file",
    "check_loaded",
    "check_parsed_config",
    "install_loader",
]

# The classes a config may build, by the import path jsonargparse records for them: Lightning's callbacks,
# loggers, profilers, precision plugins, cluster environments and strategies that take only values. Not
# LambdaCallback (it calls what it is given) nor loggers that send data elsewhere; where these write is
# checked against --out when the Trainer is built (cli/train.py). Not Timer: jsonargparse cannot write its
# enum default into the run's saved config (a traceback); trainer.max_time does its job.
_CALLBACKS = (
    "DeviceStatsMonitor", "EarlyStopping", "GradientAccumulationScheduler", "LearningRateMonitor", "ModelCheckpoint",
    "ModelSummary", "RichModelSummary", "RichProgressBar", "TQDMProgressBar",
)  # fmt: skip
ALLOWED_CLASSES = frozenset(
    {
        *(f"lightning.pytorch.callbacks.{name}" for name in _CALLBACKS),
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.profilers.AdvancedProfiler",
        "lightning.pytorch.profilers.PyTorchProfiler",
        "lightning.pytorch.profilers.SimpleProfiler",
        "lightning.pytorch.plugins.DoublePrecision",
        "lightning.pytorch.plugins.HalfPrecision",
        "lightning.pytorch.plugins.MixedPrecision",
        "lightning.fabric.plugins.environments.LightningEnvironment",
        "lightning.fabric.plugins.environments.SLURMEnvironment",
        "lightning.fabric.plugins.environments.TorchElasticEnvironment",
        "lightning.pytorch.strategies.DDPStrategy",
        "lightning.pytorch.strategies.SingleDeviceStrategy",
    }
)
_SHORT_NAMES = {path.rsplit(".", 1)[1] for path in ALLOWED_CLASSES}

# The key paths at which a Trainer takes an object built from a class path (one, or one of a list).
OBJECT_PLACES = re.compile(r"trainer\.(callbacks|logger|plugins)(\[\d+\])?|trainer\.(strategy|profiler)")

_REFUSED = "refused before importing it (a config a user was handed must not run code: build such a Trainer in Python)"


def _items(node: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(key path, key, value)`` of every entry below ``node`` (dicts, jsonargparse Namespaces, lists)."""
    if isinstance(node, dict | Namespace):
        entries = node.items() if isinstance(node, dict) else vars(node).items()
        for key, value in entries:
            path = f"{where}.{key}" if where else str(key)
            yield path, key, value
            yield from _items(value, path)
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield f"{where}[{index}]", index, value
            yield from _items(value, f"{where}[{index}]")


def _allowed_name(value: str) -> bool:
    """Whether a class path as a config writes it may be an allowlisted class: its full path, the short
    name jsonargparse resolves among the classes already imported, or another Lightning module's path to
    it (``lightning.pytorch.plugins.precision.DoublePrecision``); the parsed config then holds the class's
    own path, which must be in :data:`ALLOWED_CLASSES` exactly."""
    short = value.rsplit(".", 1)[-1]
    return value in ALLOWED_CLASSES or (short in _SHORT_NAMES and (value == short or value.startswith("lightning.")))


def _resolves_to_allowed(value: str) -> bool:
    """Whether a parsed config's class path is an allowlisted class: jsonargparse has imported it by now,
    and keeps some as they were written (``plugins``), so an alias is resolved to the class's own path."""
    if value in ALLOWED_CLASSES:
        return True
    try:
        return _allowed_name(value) and get_import_path(import_object(value)) in ALLOWED_CLASSES
    except (ImportError, AttributeError, ValueError):
        return False


def _check_class_path(where: str, value: str, source: str, *, located: bool, parsed: bool = False) -> None:
    """Refuse ``value``, given for the ``class_path`` at ``where``, unless it stands (``located``: ``where``
    is the key path from the top of the config) at one of :data:`OBJECT_PLACES` and is an allowlisted class."""
    place = where.removesuffix(".class_path")
    if located and not OBJECT_PLACES.fullmatch(place):
        raise ConfigError(
            f"{source}: {where} = {value!r}: a config builds a class only for trainer.callbacks, logger, plugins, "
            f"strategy or profiler, not under {place or 'the top level'}; {_REFUSED}"
        )
    if not (_resolves_to_allowed(value) if parsed else _allowed_name(value)):
        raise ConfigError(
            f"{source}: {where or 'class_path'} = {value!r} is not a class a config may build "
            f"(Lightning's callbacks, loggers, profilers, plugins and strategies); {_REFUSED}"
        )


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _names_outside_module(value: str) -> bool:
    """Whether a bare string is an import path of a module outside Lightning, PyTorch and this package:
    dotted identifiers whose first one is an installed top-level module (``find_spec`` locates it without
    importing it), so that file names (``imagenet.yaml``) and numbers pass."""
    if not _DOTTED.fullmatch(value) or value.split(".", 1)[0] in ("lightning", "torch", "gather_excite"):
        return False
    try:
        return importlib.util.find_spec(value.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def check_loaded(data: Any, source: str, prefix: str | None = None) -> Any:
    """Refuse ``data`` (a loaded YAML value) if it names a class or function a config may not; returns it.

    ``prefix``: the key path of ``data`` in the config (``""`` for a whole config, ``"model.arch_kwargs"``
    for that option's value), or ``None`` where it is not known (the loader), in which case only the class
    itself is checked, not its place."""
    for where, key, value in [(prefix or "", None, data), *_items(data, prefix or "")]:
        if not isinstance(value, str):
            continue
        if key == "class_path":
            _check_class_path(where, value, source, located=prefix is not None)
        elif prefix is not None and OBJECT_PLACES.fullmatch(where) and _DOTTED.fullmatch(value):
            _check_class_path(where, value, source, located=True)  # a bare class path: callbacks: [pkg.Cls]
        elif _names_outside_module(value):
            raise ConfigError(
                f"{source}: {where or 'a value'} = {value!r} names an import path outside lightning, torch, "
                f"gather_excite; {_REFUSED.removesuffix(')')}; a file name? write it as ./{value})"
            )
    return data


def check_config_file(path: str | Path, *, seen: frozenset[Path] = frozenset()) -> None:
    """:func:`check_loaded` of a YAML file with its key paths, and of the files its ``config:`` key names
    (jsonargparse reads them as part of it, relative to its folder); a file that is not YAML, is empty or
    holds something other than a mapping of settings is refused here, naming it (jsonargparse's messages
    name neither the file nor the problem's place in it). A config may not set ``resume``: which checkpoint
    a run restores (its optimizer and callbacks' state) is said on the command line, never by a handed file."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.constructor.ConstructorError):
        return  # jsonargparse reads the file next and reports what is wrong with it (tags: gex train's message)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"--config {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"--config {path}: expected a YAML mapping of settings (model:, data:, trainer:, ...), "
                          f"found {found}")  # fmt: skip
    check_loaded(data, f"--config {path}", prefix="")
    if data.get("resume") is not None:
        raise ConfigError(
            f"--config {path}: resume = {data['resume']!r}: a config does not choose the checkpoint a run "
            "continues from (it restores its optimizer and callbacks); pass --resume on the command line"
        )
    nested = data.get("config")
    for name in nested if isinstance(nested, list) else [nested]:
        if isinstance(name, str) and (path.parent / name).resolve() not in seen:
            check_config_file(path.parent / name, seen=seen | {path.resolve()})


def check_command_line(argv: list[str]) -> None:
    """:func:`check_loaded` of each command-line value with its option's key path (``--model.arch_kwargs
    '{x: {class_path: ...}}'``), before jsonargparse parses it."""
    for index, argument in enumerate(argv):
        if not argument.startswith("--") or argument in ("--config", "--"):
            continue
        key, equals, value = argument[2:].partition("=")
        if not equals:
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is None or following.startswith("--"):
                continue
            value = following
        try:
            data = yaml.safe_load(value)
        except yaml.YAMLError:
            continue  # not YAML: a plain string, which jsonargparse checks against the option's type
        check_loaded(data, f"--{key}", prefix=key.removesuffix("+"))


def install_loader() -> None:
    """Make jsonargparse's YAML loader refuse, while loading, any text that names a class outside the allowlist."""
    base = get_loader("yaml")
    if getattr(base, "guarded", False):
        return

    def guarded(text: str) -> Any:
        return check_loaded(base(text), "the config")

    guarded.guarded = True  # type: ignore[attr-defined]
    set_loader("yaml", guarded, exceptions=(yaml.YAMLError,))


def check_parsed_config(config: Any) -> None:
    """Refuse a parsed config that builds a class other than an allowlisted one at a Trainer's place, or
    holds any function, before anything is built: the last check, whichever file or option a value came from."""
    for where, key, value in _items(config):
        if key == "class_path" and isinstance(value, str):
            _check_class_path(where, value, "the config", located=True, parsed=True)
        elif inspect.isroutine(value) or inspect.isclass(value) or isinstance(value, functools.partial):
            name = f"{getattr(value, '__module__', None) or '?'}.{getattr(value, '__qualname__', repr(value))}"
            raise ConfigError(
                f"the config: {where} = {name} is a function or class given by its import path; a config holds "
                "values and the classes it builds, never code to call: pass it in Python instead"
            )
