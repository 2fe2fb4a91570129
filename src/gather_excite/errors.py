"""The project's error types for mistakes in what a user passed: arguments, configs, data folders, checkpoints.

Each is also the built-in type that Python code expects (``ValueError``, ``FileNotFoundError``,
``FileExistsError``), so library callers catch them as before. The ``gex`` commands catch
:class:`GexError` alone, print its message as one line and exit 2; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "GexError",
    "RunExistsError",
    "UnsafeFileError",
    "describe",
    "one_line",
]


class GexError(Exception):
    """A mistake in the user's input; the message names the argument or file, the value and what was expected."""


class ConfigError(GexError, ValueError):
    """An argument or config value out of its range, of the wrong kind, or unknown."""


class DataError(GexError, ValueError):
    """A data file that exists but cannot be read as the dataset it should hold."""


class DataNotFoundError(GexError, FileNotFoundError):
    """A data folder or file that is missing."""


class CheckpointError(GexError, ValueError):
    """A file that is not a complete checkpoint of this project, or one for another model or run."""


class CheckpointNotFoundError(GexError, FileNotFoundError):
    """A checkpoint path that names no file."""


class UnsafeFileError(GexError, ValueError):
    """A file whose loading would run code or build objects that plain data never needs; it was not loaded."""


class RunExistsError(GexError, FileExistsError):
    """An output folder or file that already holds results which would be overwritten."""


def one_line(error: BaseException) -> str:
    """The error's message as one line; for an error raised in a DataLoader worker, the worker's own message.

    PyTorch re-raises a worker's exception in the main process with the worker's traceback in the
    message (``Caught X in DataLoader worker process 0. Original Traceback ... X: message``).
    """
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        match = re.match(rf"^(?:[\w.]+\.)?{re.escape(type(error).__name__)}: (.*)$", last)
        text = match.group(1) if match else last
    return " ".join(text.split())


def describe(error: BaseException, *, limit: int | None = None) -> str:
    """``Type: message`` on one line (the message cut to ``limit`` characters), or the type's name where the
    message is empty: what a "cannot be read (...)" error puts in its brackets, never empty."""
    text = one_line(error)[:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
