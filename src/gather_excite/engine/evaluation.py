"""Evaluation of a trained classifier or detector, with its params and MACs, written as one JSON file per run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException

from .._atomic import write_json
from ..errors import ConfigError, one_line
from .module import SGDModule

__all__ = ["evaluate", "evaluation_trainer", "write_eval_json"]


def evaluation_trainer(accelerator: str = "auto", *, precision: str | None = None) -> L.Trainer:
    """The Trainer that evaluations run on: one device, no loggers, no checkpoints, no model summary."""
    try:
        return L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
    # Lightning's words for an unknown accelerator or precision name, or one this machine cannot honour
    except (ValueError, MisconfigurationException) as err:
        raise ConfigError(f"accelerator={accelerator!r}, precision={precision!r}: {one_line(err)}") from None


def evaluate(
    module: SGDModule,
    datamodule: L.LightningDataModule,
    *,
    trainer: L.Trainer | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Test ``module`` on the datamodule's validation split; the figures of its :meth:`~SGDModule.evaluation_report`.

    A classifier reports top-1/top-5 error (%) and loss of the recipe's single centre crop
    (ImageNet: 224 of the image resized to 256), a detector COCO AP/AR (see
    :meth:`ClassificationModule.evaluation_report` and
    :meth:`~gather_excite.detection.DetectionModule.evaluation_report`); both with params and MACs.
    ``trainer`` defaults to :func:`evaluation_trainer` (one CPU/GPU device, no loggers).
    """
    if trainer is None:
        trainer = evaluation_trainer()
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return module.evaluation_report(datamodule, metrics, checkpoint=checkpoint)


def write_eval_json(result: dict[str, Any], path: str | os.PathLike[str], *, exclusive: bool = False) -> Path:
    """Write ``result`` as indented JSON to ``path`` (atomically: temp file + ``os.replace``; ``exclusive``:
    ``FileExistsError`` where a file is there by then); returns the path."""
    return write_json(result, path, exclusive=exclusive)
