"""Detector evaluation for ``gex detect eval``/``train``: the entry point and the size the detector sees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.evaluation import evaluate

if TYPE_CHECKING:
    from .module import DetectionModule

__all__ = ["evaluate_detector", "evaluation_size"]

# The one evaluation entry point, under the detector's name: for a DetectionModule it returns
# COCO AP/AR, per-class AP, params and MACs (DetectionModule.evaluation_report says which).
evaluate_detector = evaluate


def evaluation_size(module: DetectionModule, width: int, height: int) -> tuple[int, int, int]:
    """``(3, H, W)`` of the batch the backbone sees for one ``width`` x ``height`` image.

    The detector's own transform (``GeneralizedRCNNTransform``) is run on a blank image of that
    size, so the result is exactly torchvision's: its resize floors (500x333 at 600/1000 gives
    900x600, not 901x600) and the batch is padded to a multiple of ``size_divisible`` (32).
    """
    transform = module.model.transform
    was_training = transform.training
    transform.eval()  # eval mode: the resize takes min_size[-1], as in evaluation
    try:
        with torch.no_grad():
            batch, _ = transform([torch.zeros(3, height, width)])
    finally:
        transform.train(was_training)
    _, channels, padded_height, padded_width = batch.tensors.shape
    return (channels, padded_height, padded_width)
