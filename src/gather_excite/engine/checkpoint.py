"""Checkpoints written atomically (temp file + ``os.replace``) and the per-epoch checkpoint callbacks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LAST_CHECKPOINT", "AtomicCheckpointIO", "atomic_torch_save", "checkpoint_callbacks"]

LAST_CHECKPOINT = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    A crash at any moment leaves either the previous file or the complete new one at ``path``,
    never a truncated checkpoint (``os.replace`` is atomic within one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):
        # Persist the rename itself (the directory entry) before reporting success.
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O for local paths that writes every checkpoint with :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


def checkpoint_callbacks(directory: str | os.PathLike[str], *, monitor: str | None = "val/top1_err") -> list[Any]:
    """``last.ckpt`` rewritten after every epoch, plus ``best.ckpt`` at the lowest ``monitor`` (if given)."""
    directory = str(directory)
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=directory,
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            every_n_epochs=1,
        )
    ]
    if monitor is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory,
                filename="best",
                monitor=monitor,
                mode="min",
                save_top_k=1,
                enable_version_counter=False,
                auto_insert_metric_name=False,
            )
        )
    return callbacks
