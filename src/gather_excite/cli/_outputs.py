"""Where the ``gex`` commands write, checked before any work: never over an earlier result.

An output file that exists, or an output folder that holds files, is refused in one line that
names it; ``--overwrite`` replaces it. ``gex eval``'s default file (``eval.json`` beside the
checkpoint) steps to the next free name instead: ``eval-2.json``, ...
Training runs and ``gex compare`` sweeps keep their own rule (``--resume``).
"""

from __future__ import annotations

import argparse
import os
from itertools import count
from pathlib import Path

from ..errors import ConfigError, RunExistsError

__all__ = ["add_overwrite_argument", "check_output_file", "check_output_folder", "next_free_path"]


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an output that exists (refused otherwise)")


def _check_creatable(path: Path, flag: str) -> None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so no folder can hold {path.name}")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the folder {parent} is not writable")


def check_output_file(
    path: str | os.PathLike[str], flag: str = "--out", *, overwrite: bool = False, kind: str = "file"
) -> None:
    """Refuse ``path`` unless it can become a new file (or ``overwrite`` lets it replace one): not a
    folder, its parent a folder or creatable and writable. ``kind`` names the file in the error."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; expected the path of a {kind} to write")
    if path.exists() and not overwrite:
        raise RunExistsError(f"{flag} {path}: the file exists (an earlier result); pass --overwrite to replace it")
    _check_creatable(path, flag)


def check_output_folder(path: str | os.PathLike[str], flag: str = "--out", *, overwrite: bool = False) -> None:
    """Refuse ``path`` unless it is a new or empty folder (or ``overwrite`` lets its files be replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file; expected a folder to write into")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RunExistsError(
            f"{flag} {path}: the folder holds files (an earlier result); pass --overwrite to write into it"
        )
    _check_creatable(path, flag)


def next_free_path(path: Path) -> Path:
    """``path`` if nothing is there, else the first free ``stem-2.suffix``, ``stem-3.suffix``, ..."""
    if not path.exists():
        return path
    return next(p for n in count(2) if not (p := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists())
