"""What a ``gex train``/``gex detect train`` config may name: classes of the allowlisted packages, and
no function. LightningCLI builds ``trainer.callbacks``/``logger``/``plugins``/``strategy`` from a class
path (importing its module while parsing: ``class_path: pkg.Cls``, or the bare string ``pkg.Cls``) and
imports a dotted path given for a callable argument (``LambdaCallback(on_fit_start=...)``).

Every YAML text jsonargparse reads goes through one loader (:func:`install_loader`): the ``--config``
file, a file it names for a group (``trainer: other.yaml``), a file given as ``--trainer FILE`` and each
command-line value. The loader refuses a class path outside :data:`ALLOWED_PACKAGES` before
jsonargparse can import it; the parsed config is checked again before anything in it is built or
called (:func:`check_parsed_config`)."""

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

from ..errors import ConfigError

__all__ = ["ALLOWED_PACKAGES", "check_config_file", "check_loaded", "check_parsed_config", "install_loader"]

# Top-level packages whose classes a config may name (Lightning's callbacks, loggers, strategies,
# plugins and profilers; PyTorch's; this project's). A short name (``class_path: ModelCheckpoint``)
# is resolved by jsonargparse among the classes these have already defined.
ALLOWED_PACKAGES = ("lightning", "torch", "gather_excite")


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


def _refuse_class_path(where: str, value: str, source: str) -> None:
    if "." in value and value.split(".", 1)[0] not in ALLOWED_PACKAGES:
        raise ConfigError(
            f"{source}: {where} = {value!r} names a class outside {', '.join(ALLOWED_PACKAGES)}; refused before "
            "importing it (a config a user was handed must not run code: build such a Trainer in Python)"
        )


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _names_outside_module(value: str) -> bool:
    """Whether a bare string is an import path of a module outside the allowlist: dotted identifiers whose
    first one is an installed top-level module (``find_spec`` locates it without importing it), so that
    file names (``imagenet.yaml``) and numbers pass."""
    if not _DOTTED.fullmatch(value) or value.split(".", 1)[0] in ALLOWED_PACKAGES:
        return False
    try:
        return importlib.util.find_spec(value.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def check_loaded(data: Any, source: str) -> Any:
    """Refuse ``data`` (a loaded YAML value) if it names a class or function outside the allowlist; returns it."""
    entries = [("", None, data), *_items(data)]
    for where, key, value in entries:
        if not isinstance(value, str):
            continue
        if key == "class_path":
            _refuse_class_path(where, value, source)
        elif _names_outside_module(value):
            raise ConfigError(
                f"{source}: {where or 'a value'} = {value!r} names an import path outside "
                f"{', '.join(ALLOWED_PACKAGES)}; refused before importing it (a config a user was handed must "
                f"not run code: build such a Trainer in Python; a file name? write it as ./{value})"
            )
    return data


def check_config_file(path: str | Path) -> None:
    """:func:`check_loaded` of a YAML file, naming it (the loader checks it again, as "the config"); a file
    that is not YAML, is empty or holds something other than a mapping of settings is refused here,
    naming it (jsonargparse's messages name neither the file nor the problem's place in it)."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
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
    check_loaded(data, f"--config {path}")


def install_loader() -> None:
    """Make jsonargparse's YAML loader refuse, while loading, any text that names an outside class."""
    base = get_loader("yaml")
    if getattr(base, "guarded", False):
        return

    def guarded(text: str) -> Any:
        return check_loaded(base(text), "the config")

    guarded.guarded = True  # type: ignore[attr-defined]
    set_loader("yaml", guarded, exceptions=(yaml.YAMLError,))


def check_parsed_config(config: Any) -> None:
    """Refuse a parsed config that names an outside class or holds any function, before it is built."""
    for where, key, value in _items(config):
        if key == "class_path" and isinstance(value, str):
            _refuse_class_path(where, value, "the config")
        elif inspect.isroutine(value) or inspect.isclass(value) or isinstance(value, functools.partial):
            name = f"{getattr(value, '__module__', None) or '?'}.{getattr(value, '__qualname__', repr(value))}"
            raise ConfigError(
                f"the config: {where} = {name} is a function or class given by its import path; a config holds "
                "values and the classes it builds, never code to call: pass it in Python instead"
            )
