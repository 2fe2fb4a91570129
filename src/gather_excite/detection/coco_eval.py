"""COCO's own evaluation protocol through ``pycocotools.cocoeval.COCOeval``, with per-class AP."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["STAT_NAMES", "coco_evaluate"]

# The order of COCOeval.stats for bounding boxes (COCOeval.summarize).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _value(number: float) -> float | None:
    # COCOeval writes -1 where a quantity is undefined (no ground truth in that area range).
    return None if number < 0 else float(number)


def _no_detections(ground_truth: COCO) -> COCO:
    """The result index of a model that found nothing, built as ``loadRes`` would (which refuses an empty list).

    COCOeval then decides each figure as usual: 0 where ground truth exists, undefined (-1,
    ``None`` here) where it does not (no large boxes, a category without boxes).
    """
    empty = COCO()
    empty.dataset = {
        "images": list(ground_truth.dataset["images"]),
        "categories": copy.deepcopy(ground_truth.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def coco_evaluate(
    ground_truth: COCO,
    predictions: Sequence[tuple[int, list[dict[str, Any]]]],
    *,
    categories: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Bounding-box AP/AR of ``predictions`` against ``ground_truth`` on the images that were predicted.

    ``predictions`` holds ``(image_id, detections)`` per evaluated image, detections as COCO
    results (``category_id``, ``bbox`` [x, y, w, h], ``score``); an image listed twice (the
    padding of a distributed sampler) counts once. Returns the 12 COCOeval statistics
    (fractions in [0, 1], ``None`` where COCO leaves them undefined), ``per_class_AP``
    keyed by category name (AP at IoU .50:.95, all areas, 100 detections: COCOeval's own
    precision table averaged the way ``summarize`` does), and ``num_images``/``num_detections``.
    """
    per_image: dict[int, list[dict[str, Any]]] = {}
    for image_id, detections in predictions:
        per_image.setdefault(int(image_id), detections)
    results = [{"image_id": image_id, **d} for image_id, dets in per_image.items() for d in dets]
    image_ids = sorted(per_image)
    names = {int(c["id"]): str(c["name"]) for c in categories}
    summary = {
        "num_images": len(image_ids),
        "num_detections": len(results),
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        detections = ground_truth.loadRes(results) if results else _no_detections(ground_truth)
        evaluator = COCOeval(ground_truth, detections, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: _value(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)}
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections];
    # area "all" is index 0, 100 detections the last; -1 marks undefined entries.
    precision = evaluator.eval["precision"]
    per_class = {}
    for index, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, index, 0, -1]
        defined = values[values > -1]
        per_class[names.get(int(category_id), str(category_id))] = float(np.mean(defined)) if defined.size else None
    return {**stats, "per_class_AP": per_class, **summary}
