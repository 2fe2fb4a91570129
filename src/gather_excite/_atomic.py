"""Files written whole or not at all: a temporary file beside the target, flushed to disk, then
``os.replace``-d onto it. A crash at any moment leaves the previous file or the complete new one,
never a truncated file that a later command would read as a result."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp's files are private (0600); the result gets the mode a plain open() would give it.
_FILE_MODE = 0o666 & ~_umask()


def _fsync_folder(folder: Path) -> None:
    """Persist a rename (the folder's entry) where the system allows opening a folder."""
    if hasattr(os, "O_DIRECTORY"):
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", *, newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"w"`` or ``"wb"``) that becomes ``path`` when the
    block ends without an error; on an error it is removed and ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, newline=newline) if mode == "w" else os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        # e.g. ``path`` is a folder, or the process is interrupted: no temporary file stays behind.
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_json(data: Any, path: str | os.PathLike[str], *, indent: int = 2, allow_nan: bool = True) -> Path:
    """``data`` as indented JSON (and a final newline) at ``path``, atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=indent, allow_nan=allow_nan)
        handle.write("\n")
    return path
