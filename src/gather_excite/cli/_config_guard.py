"""What a ``gex train``/``gex detect train`` config may name: classes of the allowlisted packages, and
no function. LightningCLI builds ``trainer.callbacks``/``logger``/``plugins``/``strategy`` from a
``class_path`` (importing its module while parsing) and imports a dotted path given for a callable
argument (``LambdaCallback(on_fit_start=...)``). A config file is checked before it is parsed (its
``class_path`` values), the parsed config before anything in it is built or called."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from ..errors import ConfigError

__all__ = ["ALLOWED_PACKAGES", "check_config_file", "check_parsed_config"]

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


def check_config_file(path: str | Path) -> None:
    """Refuse a YAML config whose ``class_path`` names a module outside :data:`ALLOWED_PACKAGES`."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # jsonargparse reads the file next and reports what is wrong with it
    for where, key, value in _items(data):
        if key == "class_path" and isinstance(value, str):
            _refuse_class_path(where, value, f"--config {path}")


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
