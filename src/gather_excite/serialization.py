"""Reading files a user was handed, each way they fail as one :class:`~gather_excite.errors.GexError` line
that names the file: ``torch.save`` files with ``torch.load(weights_only=True)`` only (checkpoints,
``pretrained=`` weights, detector checkpoints) and JSON files (reports, configs, sweep records)."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, DataError, UnsafeFileError, describe, one_line

__all__ = ["load_json_file", "load_torch_file"]


def load_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON value in ``path``; :class:`~gather_excite.errors.DataError` naming ``what`` when the
    file is not UTF-8 JSON (truncated, or another kind of file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{what} is not a JSON file ({one_line(err)})") from None


_ADVICE = ("Weights only load failed", "Check the documentation of torch.load", "Please file an issue")


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, without PyTorch's advice around it (which suggests
    ``weights_only=False``, the very load this module exists to avoid)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or " ".join(lines[index + 1 : index + 2])
            return reason.split(". Please use", 1)[0]
    own = [line for line in lines if not line.startswith(_ADVICE)]
    return (" ".join(own) or type(error).__name__)[:200]


def _names_a_global(reason: str) -> bool:
    """Whether the unpickler stopped at a global outside the allowlist, in either of PyTorch's wordings
    ("Unsupported global: GLOBAL builtins.exec", "Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked")."""
    return "unsupported global" in reason.lower()


def load_torch_file(
    path: str | os.PathLike[str], what: str, *, map_location: str | torch.device = "cpu", mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python values, nothing imported or called.

    ``what`` names the file in the errors (e.g. ``"checkpoint 'last.ckpt'"``). Raises
    :class:`~gather_excite.errors.UnsafeFileError` when the file names a global outside the weights-only
    allowlist (a pickled object or callable, which a full load would build or call) and
    :class:`~gather_excite.errors.CheckpointError` when it is truncated, corrupt or not a ``torch.save``
    file at all (whatever the unpickler met: ``EOFError``, ``KeyError``, ``RuntimeError``, ...).
    """
    try:
        # mmap reads only torch.save's zip format; any other file is read (and reported on) as a whole
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if _names_a_global(reason):
            raise UnsafeFileError(
                f"{what} was refused as unsafe: it holds pickled Python objects that a weights-only load does not "
                f"build, and loading it fully could run code ({reason}); it was not loaded"
            ) from None
        raise CheckpointError(f"{what} is incomplete or corrupt, or not a torch.save file ({reason})") from None
    except OSError as err:
        raise CheckpointError(f"{what} cannot be read ({err.strerror or one_line(err)})") from None
    except Exception as err:  # any failure to parse the bytes means a bad file: one line, not a traceback
        raise CheckpointError(
            f"{what} is incomplete or corrupt (truncated while written or copied?), or not a torch.save file "
            f"({describe(err, limit=200)})"
        ) from None
