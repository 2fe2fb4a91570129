"""A CSV logger that appends to its ``metrics.csv`` when a run resumes, instead of deleting it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from .._atomic import atomic_write

__all__ = ["DiscardRedoneRows", "ResumableCSVLogger"]


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is kept and its columns carried on."""

    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes an existing metrics.csv here; a resumed run appends instead.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives restarts: ``--resume`` continues the same file.

    A resumed run first drops the rows logged after the checkpoint it continues from
    (:meth:`discard_rows_after`, called by :class:`DiscardRedoneRows`), so the steps it redoes
    appear once.
    """

    @property
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def discard_rows_after(self, *, epoch: int, step: int) -> None:
        """Drop rows of a later epoch than ``epoch``, or of ``epoch`` itself at ``step`` or later.

        ``epoch``/``step`` are where a resumed run continues (``trainer.current_epoch``,
        ``trainer.global_step`` once the checkpoint is restored); the rows dropped were logged by
        the run that died after that checkpoint was written, and are about to be logged again.
        """
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = list(reader.fieldnames or []), list(reader)

        def redone(row: dict[str, str]) -> bool:
            row_epoch = int(float(row["epoch"])) if row.get("epoch") else None
            row_step = int(float(row["step"])) if row.get("step") else None
            if row_epoch is None or row_step is None:
                return False
            return row_epoch > epoch or (row_epoch == epoch and row_step >= step)

        kept = [row for row in rows if not redone(row)]
        if len(kept) == len(rows):
            return
        with atomic_write(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)


class DiscardRedoneRows(L.Callback):
    """When a run resumes, drops the CSV rows logged after its checkpoint (they are about to be redone)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.discard_rows_after(epoch=trainer.current_epoch, step=trainer.global_step)
