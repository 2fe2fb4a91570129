"""Single-crop evaluation: top-1/top-5 error with the model's params and MACs, written as one JSON file per run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L

from ..complexity import complexity
from ..data import ImageClassificationData
from .module import ClassificationModule

__all__ = ["evaluate", "evaluation_trainer", "write_eval_json"]


def evaluation_trainer(accelerator: str = "auto", *, precision: str | None = None) -> L.Trainer:
    """The Trainer that evaluations run on: one device, no loggers, no checkpoints, no model summary."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def evaluate(
    module: ClassificationModule,
    datamodule: ImageClassificationData,
    *,
    trainer: L.Trainer | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 error (%) and loss of ``module`` on the datamodule's validation split, with params and MACs.

    The evaluation transform is the recipe's single centre crop (ImageNet: 224 of the image
    resized to 256). ``trainer`` defaults to a CPU/GPU ``Trainer`` without loggers.
    """
    if trainer is None:
        trainer = evaluation_trainer()
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    counts = complexity(module.net, input_size=module.image_size)
    hp = module.hparams
    return {
        "model": hp["arch"],
        "arch_kwargs": dict(hp.get("arch_kwargs") or {}),
        "checkpoint": checkpoint,
        "dataset": datamodule.dataset,
        "data_root": datamodule.root,
        "split": "test" if datamodule.dataset != "imagefolder" else datamodule.val_split,
        "num_images": len(datamodule.val_set) if datamodule.val_set is not None else None,
        "crop": list(module.image_size),
        "top1_err": float(metrics["test/top1_err"]),
        "top5_err": float(metrics["test/top5_err"]),
        "top5_k": min(5, int(hp["num_classes"])),
        "loss": float(metrics["test/loss"]),
        "params": int(counts["params"]),
        "macs": int(counts["macs"]),
    }


def write_eval_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as indented JSON to ``path`` (atomically: temp file + ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(temporary, path)
    except BaseException:
        # e.g. ``path`` is a folder: the temporary file must not stay behind.
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
