"""Detector evaluation for ``gex detect eval``/``train``: the entry point and the size the detector sees."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engine.evaluation import evaluate

if TYPE_CHECKING:
    from .module import DetectionModule

__all__ = ["evaluate_detector", "evaluation_size"]

# The one evaluation entry point, under the detector's name: for a DetectionModule it returns
# COCO AP/AR, per-class AP, params and MACs (DetectionModule.evaluation_report says which).
evaluate_detector = evaluate


def evaluation_size(module: DetectionModule, width: int, height: int) -> tuple[int, int, int]:
    """``(3, H, W)`` that the detector resizes a ``width`` x ``height`` image to (torchvision's rule)."""
    min_size, max_size = module.hparams["min_size"], module.hparams["max_size"]
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return (3, round(height * scale), round(width * scale))
