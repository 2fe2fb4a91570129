"""Where the ``gex`` commands write, checked before any work: never over an earlier result.

An output file that exists, or an output folder that holds files, is refused in one line that
names it; ``--overwrite`` replaces it. ``gex eval``'s default file (``eval.json`` beside the
checkpoint) steps to the next free name instead: ``eval-2.json``, ...
Training runs and ``gex compare`` sweeps keep their own rule (``--resume``), with the same check that
their folder can be written (:func:`check_writable_folder`). An output that is one of the command's
own inputs is refused whatever ``--overwrite`` says (:func:`check_not_an_input`). A run writes only inside
its folder: a config-built logger, callback or profiler that would write elsewhere (:func:`check_inside`),
and a run folder holding a link that leads out of it (:func:`check_no_links_out`), are refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from itertools import count
from pathlib import Path

from ..errors import ConfigError, RunExistsError

__all__ = [
    "add_overwrite_argument",
    "check_inside",
    "check_no_links_out",
    "check_not_an_input",
    "check_output_file",
    "check_output_folder",
    "check_writable_folder",
    "next_free_path",
]


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an output that exists (refused otherwise)")


def _check_creatable(path: Path, flag: str) -> None:
    """``path`` can be made: its nearest existing ancestor is a folder this process may write into."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so no folder can hold {path.name}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder {parent} is not writable")


def check_writable_folder(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """Refuse in one line unless files can be written into the folder ``path``: the folder itself where
    it exists (its parent does not matter then), else the nearest existing folder it would be made in."""
    path = Path(path)
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: the folder is not writable")
        return
    if path.exists():
        raise ConfigError(f"{flag} {path}: is a file; expected a folder to write into")
    _check_creatable(path, flag)


def _same(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return first.resolve() == second.resolve()


def _leaves(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path``, its links and ``..`` resolved (a relative one against the working directory, as
    the file system does), lies outside ``folder`` resolved the same way."""
    root = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), root]) != root


def check_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str], what: str, flag: str = "--out") -> None:
    """Refuse ``path``, where ``what`` (a config's setting) would write, unless it lies inside ``folder``:
    a handed config must not write over another run's checkpoints or logs."""
    if _leaves(path, folder):
        raise ConfigError(
            f"{what} = {str(path)!r} is outside {flag} {folder}; a run writes only into its own folder: set it "
            f"to a path inside {folder}, or remove it (nothing was written)"
        )


def check_no_links_out(folder: str | os.PathLike[str], flag: str = "--out") -> None:
    """Refuse a run folder that holds a symbolic link (at any depth) leading out of it: the run writes
    through its entries (``csv/metrics.csv``, ``checkpoints/last.ckpt``), so a handed folder with
    ``csv -> ../other/csv`` would rewrite another run's files. ``folder`` itself may be a link."""
    for parent, folders, files in os.walk(folder):  # a linked folder is listed, never entered
        for name in folders + files:
            entry = os.path.join(parent, name)
            if os.path.islink(entry) and _leaves(entry, folder):
                raise ConfigError(
                    f"{flag} {folder}: {entry} is a link to {os.path.realpath(entry)}, outside the run folder; "
                    "the run would write through it: remove the link or choose another --out (nothing was written)"
                )


def check_not_an_input(
    path: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str] | None]], flag: str = "--out"
) -> None:
    """Refuse an output ``path`` that is one of the command's inputs (``(what, path)`` pairs; ``None`` is
    skipped), or a folder that holds one: writing it would replace or remove that input. The same
    file under another name (a link, ``./x``, an absolute path) counts too; ``--overwrite`` does not help."""
    path = Path(path)
    for what, source in inputs:
        if source is None or not Path(source).exists():
            continue
        source = Path(source)
        if _same(path, source):
            raise ConfigError(
                f"{flag} {path}: is the {what} {str(source)!r} itself; writing there would replace the input "
                f"with the output: choose another {flag}"
            )
        if path.is_dir() and source.resolve().is_relative_to(path.resolve()):
            raise ConfigError(
                f"{flag} {path}: holds the {what} {str(source)!r}; writing the folder would replace or remove it: "
                f"choose another {flag}"
            )


def check_output_file(
    path: str | os.PathLike[str], flag: str = "--out", *, overwrite: bool = False, kind: str = "file"
) -> None:
    """Refuse ``path`` unless it can become a new file (or ``overwrite`` lets it replace one): not a
    folder, its parent a folder or creatable and writable. ``kind`` names the file in the error."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; expected the path of a {kind} to write")
    if os.path.lexists(path) and not overwrite:
        raise RunExistsError(f"{flag} {path}: the file exists (an earlier result); pass --overwrite to replace it")
    _check_creatable(path, flag)


def check_output_folder(
    path: str | os.PathLike[str], flag: str = "--out", *, overwrite: bool = False, replaced_whole: bool = False
) -> None:
    """Refuse ``path`` unless it is a new or empty folder (or ``overwrite`` lets its files be replaced)
    that can be written. ``replaced_whole``: the output is built beside the folder and swapped in, so
    the folder that holds it must be writable too."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file; expected a folder to write into")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RunExistsError(
            f"{flag} {path}: the folder holds files (an earlier result); pass --overwrite to write into it"
        )
    check_writable_folder(path, flag)
    if replaced_whole:
        _check_creatable(path.absolute(), flag)


def next_free_path(path: Path) -> Path:
    """``path`` if no name is there (a dangling link counts), else the first free ``stem-2.suffix``, ..."""
    if not os.path.lexists(path):
        return path
    return next(p for n in count(2) if not os.path.lexists(p := path.with_name(f"{path.stem}-{n}{path.suffix}")))
