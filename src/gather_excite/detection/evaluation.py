"""Detector evaluation for ``gex detect eval``/``train``: COCO AP with params and MACs at the evaluation size."""

from __future__ import annotations

from typing import Any

import lightning as L

from ..complexity import complexity
from ..engine.evaluation import evaluation_trainer
from ..errors import DataError
from .data import CocoDetectionData
from .module import DetectionModule

__all__ = ["evaluate_detector", "evaluation_size"]


def evaluation_size(module: DetectionModule, width: int, height: int) -> tuple[int, int, int]:
    """``(3, H, W)`` that the detector resizes a ``width`` x ``height`` image to (torchvision's rule)."""
    min_size, max_size = module.hparams["min_size"], module.hparams["max_size"]
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return (3, round(height * scale), round(width * scale))


def evaluate_detector(
    module: DetectionModule,
    datamodule: CocoDetectionData,
    *,
    trainer: L.Trainer | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """COCO bbox AP/AR (fractions), per-class AP, the category map, params and MACs of ``module``.

    MACs are counted (:func:`gather_excite.complexity`) for one forward pass at the size the
    detector gives the first validation image: ``backbone_macs`` for the backbone (and FPN),
    ``macs`` for the whole detector on a blank image of that size, whose RoI head runs on the
    proposals that the RPN keeps there (at most ``rpn_post_nms_top_n_test``).
    """
    if trainer is None:
        trainer = evaluation_trainer()
    trainer.test(module, datamodule=datamodule, verbose=False)
    result = module.coco_result
    if result is None:
        raise DataError("the evaluation produced no COCO result (empty validation split?)")
    first = datamodule.val_coco.imgs[min(datamodule.val_coco.imgs)]
    size = evaluation_size(module, int(first["width"]), int(first["height"]))
    counts = complexity(module.model, input_size=size)
    backbone = complexity(module.model.backbone, input_size=size)
    hp = module.hparams
    return {
        "model": hp["backbone"],
        "layout": hp["layout"],
        "backbone_kwargs": dict(hp.get("backbone_kwargs") or {}),
        "checkpoint": checkpoint,
        "data_root": str(datamodule.root),
        "val_annotations": str(datamodule.hparams["val_annotations"]),
        "categories": [dict(c, label=i + 1) for i, c in enumerate(hp["categories"])],
        **result,
        "eval_size": list(size),
        "params": int(counts["params"]),
        "macs": int(counts["macs"]),
        "backbone_params": int(backbone["params"]),
        "backbone_macs": int(backbone["macs"]),
    }
