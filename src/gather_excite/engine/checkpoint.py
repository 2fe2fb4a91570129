"""Checkpoints written atomically (temp file + ``os.replace``) and the per-epoch checkpoint callbacks."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from .._atomic import atomic_write
from ..errors import CheckpointError, CheckpointNotFoundError
from ..serialization import load_torch_file

__all__ = ["LAST_CHECKPOINT", "AtomicCheckpointIO", "atomic_torch_save", "checkpoint_callbacks", "read_checkpoint"]

LAST_CHECKPOINT = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically (:func:`gather_excite._atomic.atomic_write`).

    A crash at any moment leaves either the previous file or the complete new one at ``path``,
    never a truncated checkpoint (``os.replace`` is atomic within one file system).
    """
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def read_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict of a ``gex train``/``gex compare`` checkpoint, read with ``torch.load(weights_only=True)``.

    Only tensors and plain Python values are admitted; nothing the file names is imported or called.
    Raises :class:`~gather_excite.errors.CheckpointError` naming the file when it is missing,
    incomplete, or not a checkpoint of this project (e.g. a bare state dict), and
    :class:`~gather_excite.errors.UnsafeFileError` when it holds pickled objects that a weights-only
    load refuses.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    checkpoint = load_torch_file(path, f"checkpoint {str(path)!r}", map_location=map_location)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, dict) and "arch" not in hparams and {"backbone", "layout"} <= set(hparams):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a detector checkpoint (gex detect train); expected a classifier "
            "checkpoint (gex train, gex compare): evaluate detectors with gex detect eval"
        )
    if not isinstance(hparams, dict) or "arch" not in hparams or not isinstance(checkpoint.get("state_dict"), dict):
        tensors = isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        if checkpoint and tensors:
            what = f"a bare state dict of {len(checkpoint)} tensors (first key {next(iter(checkpoint))!r})"
            todo = (
                "load such weights with gather_excite.create_model(NAME, pretrained=path) (a .pth or .safetensors "
                "file); gex needs a .ckpt written by gex train or gex compare"
            )
        else:
            keys = ", ".join(map(repr, list(checkpoint)[:5])) if isinstance(checkpoint, dict) else ""
            what = f"a {type(checkpoint).__name__}" + (f" with keys {keys}" if keys else "")
            todo = "expected a .ckpt written by gex train or gex compare (keys 'state_dict' and 'hyper_parameters')"
        raise CheckpointError(f"{str(path)!r} is not a checkpoint of this project: it holds {what}; {todo}")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O for local paths that writes every checkpoint with :func:`atomic_torch_save`,
    and touches no file outside the run folder ``root``.

    A checkpoint's ModelCheckpoint states name the files Lightning later removes as superseded (the
    previous best, last, top-k); a handed checkpoint naming ``OUT/checkpoints/../../victim`` made Lightning
    ``rm -r`` that folder (it does not resolve ``..``, and removes recursively). So names outside ``root``
    are dropped from those states on loading (:meth:`load_checkpoint`; a checkpoint of another run continued
    in a new folder names that run's files, so this is said and not refused), and only a regular ``*.ckpt``
    file inside ``root`` is ever removed (:meth:`remove_checkpoint`). Inside ``root`` any folder is fine: a
    config's own ModelCheckpoint may keep its files in a folder of its own (its ``dirpath``).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.root = None if root is None else Path(root)

    def _own(self, path: Any) -> bool:
        """Whether ``path`` names a ``*.ckpt`` file inside ``root``, links and ``..`` resolved."""
        if not isinstance(path, str | os.PathLike) or "://" in str(path):
            return False
        real = Path(os.path.realpath(path))
        return real.suffix == ".ckpt" and (
            self.root is None or real.parent.is_relative_to(Path(os.path.realpath(self.root)))
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(path, *args, **kwargs)
        if self.root is None:
            return checkpoint
        dropped = []
        for state in (checkpoint.get("callbacks") or {}).values():
            if not isinstance(state, dict) or "best_model_path" not in state:  # not a ModelCheckpoint's
                continue
            for key in ("best_model_path", "last_model_path", "kth_best_model_path"):
                if state.get(key) and not self._own(state[key]):
                    dropped.append(f"{key} {state[key]!r}")
                    state[key] = ""
            best_k = state.get("best_k_models")
            for name in [name for name in best_k if not self._own(name)] if isinstance(best_k, dict) else []:
                dropped.append(f"best_k_models {name!r}")
                del best_k[name]
        if dropped:
            warnings.warn(
                f"{path}: its ModelCheckpoint state names {', '.join(dropped)}, not files in this run's folder "
                f"{self.root}; not restored (they would be replaced or removed as superseded)",
                stacklevel=2,
            )
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Remove a superseded checkpoint: a regular ``*.ckpt`` file inside ``root``, never a folder or a
        link; anything else is left where it is, with a warning."""
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except (OSError, TypeError, ValueError):
            return  # already gone (or no local path: nothing of this run)
        if regular and self._own(path):
            os.remove(path)
            return
        warnings.warn(
            f"{path}: not removed as a superseded checkpoint: only a *.ckpt file in {self.root or 'the run folder'} is",
            stacklevel=2,
        )


def checkpoint_callbacks(
    directory: str | os.PathLike[str],
    *,
    monitor: str | None = "val/top1_err",
    mode: str = "min",
    last_on_train_epoch_end: bool = False,
) -> list[Any]:
    """``last.ckpt`` rewritten after every epoch, plus ``best.ckpt`` at the best (``mode``: min/max) ``monitor``.

    ``last.ckpt`` is written after each epoch's validation; with ``last_on_train_epoch_end`` after
    each training epoch instead, so that a run validating every few epochs (detection) still
    keeps every epoch.
    """
    directory = str(directory)
    last = ModelCheckpoint(
        dirpath=directory,
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
        every_n_epochs=1,
        save_on_train_epoch_end=True if last_on_train_epoch_end else None,
    )
    if monitor is None:
        return [last]
    best = ModelCheckpoint(
        dirpath=directory,
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    # best first: the callbacks run in this order when an epoch's validation ends, and last.ckpt
    # stores every callback's state, so it must see best's after this epoch's score (a resumed run
    # would otherwise compare against the previous epoch's best and could overwrite best.ckpt).
    return [best, last]
