"""Files written whole or not at all: a temporary file beside the target, flushed to disk, then
``os.replace``-d onto it. A crash at any moment leaves the previous file or the complete new one,
never a truncated file that a later command would read as a result.

:func:`atomic_write` hands out an open file, :func:`atomic_path` a path (for writers that take only
a file name), :func:`atomic_folder` a folder that replaces another one whole.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import RunExistsError

__all__ = ["atomic_folder", "atomic_path", "atomic_write", "lock_folder", "write_json"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp's files and mkdtemp's folders are private (0600, 0700); the results get the modes a plain
# open() and mkdir() would give them.
_FILE_MODE = 0o666 & ~_umask()
_FOLDER_MODE = 0o777 & ~_umask()


def _fsync(path: Path, flags: int = 0) -> None:
    descriptor = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(folder: Path) -> None:
    """Persist a rename (the folder's entry) where the system allows opening a folder."""
    if hasattr(os, "O_DIRECTORY"):
        _fsync(folder, os.O_DIRECTORY)


def _claim(temporary: str, path: Path) -> None:
    """Move ``temporary`` to ``path`` only if no name ``path`` exists (a dangling link counts), else
    ``FileExistsError``: a hard link, which the kernel refuses onto an existing name; where the file
    system has no hard links, an exclusive create of ``path`` first (the name is then taken for this
    file before it is filled by the rename)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError:  # EPERM/ENOTSUP: no hard links here (vfat, some network file systems)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
        os.replace(temporary, path)
        return
    os.unlink(temporary)


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, newline: str | None = None, exclusive: bool = False
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"w"`` or ``"wb"``) that becomes ``path`` when the
    block ends without an error; on an error it is removed and ``path`` is left as it was.

    ``exclusive``: ``path`` is claimed only if nothing is there at that moment (a hard link, which the
    kernel refuses onto an existing name), else ``FileExistsError``: what another command wrote there
    meanwhile is never replaced."""
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
        if exclusive:
            _claim(temporary, path)
        else:
            os.replace(temporary, path)
    except BaseException:
        # e.g. ``path`` is a folder, or the process is interrupted: no temporary file stays behind.
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A path to write (and read back, e.g. to check it) that becomes ``path`` when the block ends without
    an error: ``path``'s name in a new private folder beside it. On an error the folder and all in it
    are removed and ``path`` is left as it was.

    For writers that take a file name only (ONNX's ``save``). Any other file the writer puts beside
    it (ONNX's ``<name>.data`` of a model over 1.5 GB) is moved beside ``path`` first; only ``path``
    itself is replaced atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    temporary = folder / path.name
    try:
        yield temporary
        if not temporary.is_file():
            raise FileNotFoundError(f"nothing was written to {temporary}")
        others = [file for file in folder.iterdir() if file != temporary]
        for file in [*others, temporary]:
            _fsync(file)
            os.chmod(file, _FILE_MODE)
        for file in others:
            os.replace(file, path.parent / file.name)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_folder(path.parent)


def _swap_in(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``; an existing folder there ends up at ``new`` (to be removed).

    The old folder is renamed aside and the new one renamed in. Between those two renames
    (microseconds) ``path`` does not exist: a crash exactly then leaves the old folder complete at
    ``.<name>.*.old`` and the new one complete at ``.<name>.*.tmp`` beside it. (Linux's
    ``renameat2(RENAME_EXCHANGE)`` would close that window; Python has no portable call for it.)
    """
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    os.rename(path, aside)  # onto the empty folder just made: allowed for folders
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    os.rename(aside, new)


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A new empty folder to fill that replaces the folder ``path`` whole (or becomes it) when the block
    ends without an error; on an error it is removed and ``path`` is left as it was.

    The new folder is made beside ``path`` (``.<name>.*.tmp``, on the same file system), its files are
    flushed to disk, then it takes ``path``'s place (see :func:`_swap_in`) and the old folder, with
    everything in it, is removed. A crash leaves the old complete folder or the new complete one at
    ``path`` (and at most a hidden ``.<name>.*`` folder beside it). ``path`` may be a link to a folder:
    the folder it names is replaced. Its files get the mode a plain ``open()`` gives them (0666 less the
    umask), whatever mode their writer gave them.
    """
    path = Path(os.path.abspath(path))  # "." has no sibling to be swapped with
    if path.is_symlink() and path.is_dir():
        path = path.resolve()
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder, so it is not replaced by one", os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _fsync(file)
                # As atomic_path's: the mode open() gives; some writers make private files (safetensors'
                # save_file 0600), which would leave an export unreadable to the group.
                os.chmod(file, _FILE_MODE)
        for folder in [*(f for f in temporary.rglob("*") if f.is_dir() and not f.is_symlink()), temporary]:
            _fsync_folder(folder)
        # The replaced folder's mode (e.g. a group's setgid 2775), else what mkdir would give.
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.is_dir() else _FOLDER_MODE)
        _swap_in(temporary, path)
        _fsync_folder(path.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # the old folder after a swap, else the unfinished new one


def write_json(
    data: Any, path: str | os.PathLike[str], *, indent: int = 2, allow_nan: bool = True, exclusive: bool = False
) -> Path:
    """``data`` as indented JSON (and a final newline) at ``path``, atomically (``exclusive``: see
    :func:`atomic_write`); returns the path."""
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as handle:
        json.dump(data, handle, indent=indent, allow_nan=allow_nan)
        handle.write("\n")
    return path


def lock_folder(folder: str | os.PathLike[str], busy: str) -> int | None:
    """Take an exclusive lock on ``folder`` (created if needed) that lasts until ``os.close`` of the
    returned handle or the end of the process, however it ends; a second command that asks for it
    meanwhile gets :class:`~gather_excite.errors.RunExistsError` with the message ``busy``. The lock
    is the kernel's (``flock`` on the folder itself: no file is written, none is left behind).
    Without ``fcntl`` (Windows): no lock, ``None``."""
    try:
        import fcntl
    except ImportError:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process holds it
        os.close(handle)
        raise RunExistsError(busy) from None
    except OSError as err:  # a file system without flock (Lustre without -o flock, some NFS mounts)
        os.close(handle)
        warnings.warn(f"{folder}: cannot lock the folder on this file system ({err.strerror}); a second "
                      "command into it is not refused", stacklevel=2)  # fmt: skip
        return None
    return handle
