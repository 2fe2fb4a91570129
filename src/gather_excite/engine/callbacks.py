"""Training-speed measurement: images per second of the optimisation steps alone."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

__all__ = ["TrainSpeed"]


class TrainSpeed(L.Callback):
    """Sums the wall time from each training batch's start to its end (forward, backward, update).

    Data loading between batches and validation are excluded; ``images_per_second`` is the
    total number of training images over that time (this process only), and logged per epoch.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    @property
    def images_per_second(self) -> float:
        """Training images per second so far (0 before the first step)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch[0])  # a tensor batch or a detection batch's list of images

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("train/images_per_s", self.images_per_second)
