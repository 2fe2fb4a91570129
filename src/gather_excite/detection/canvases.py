"""A small real-image detection set: Fashion-MNIST items pasted onto blank canvases, as COCO folders.

Each canvas holds ``min_items``..``max_items`` real Fashion-MNIST images, each resized by a
random factor and pasted at a random position so that it overlaps every earlier item's box
by at most ``max_overlap`` (intersection over the smaller box). Boxes are the tight boxes
of each pasted item's visible pixels, labels its Fashion-MNIST class. Training canvases use
the training split's images, validation canvases the test split's, so no item is seen in
both. The same arguments always give the same files (one seeded NumPy generator per split).

Layout written under ``out``::

    train/000000.png ...   annotations/instances_train.json
    val/000000.png ...     annotations/instances_val.json
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._atomic import write_json
from ..data.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES, fashion_mnist_dataset
from ..errors import ConfigError

__all__ = ["CanvasSpec", "make_fashion_mnist_detection"]

# Pixels at or below this (of 255) are background: the resampling halo of a pasted item
# would otherwise widen its box by a faint pixel.
_VISIBLE = 24


@dataclass(frozen=True)
class CanvasSpec:
    """Options of :func:`make_fashion_mnist_detection` (checked on construction)."""

    canvas_size: int = 96
    train_count: int = 2000
    val_count: int = 300
    min_items: int = 1
    max_items: int = 6
    min_scale: float = 0.75
    max_scale: float = 1.5
    max_overlap: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("canvas_size", "train_count", "val_count", "min_items", "max_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_items < self.min_items:
            raise ConfigError(f"max_items must be >= min_items ({self.min_items}), got {self.max_items}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0 (numpy's generators take no negative seed), got {self.seed!r}")
        if not all(math.isfinite(scale) for scale in (self.min_scale, self.max_scale)):
            raise ConfigError(f"scales must be finite, got {self.min_scale}, {self.max_scale}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ConfigError(f"scales must satisfy 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if round(28 * self.max_scale) > self.canvas_size:
            raise ConfigError(
                f"max_scale {self.max_scale} makes items of {round(28 * self.max_scale)} px, larger than "
                f"canvas_size {self.canvas_size}"
            )
        if not 0 <= self.max_overlap < 1:
            raise ConfigError(f"max_overlap must be in [0, 1), got {self.max_overlap!r}")


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area over the smaller box's area, boxes as (x0, y0, x1, y1)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def _split(
    images: np.ndarray, labels: np.ndarray, count: int, spec: CanvasSpec, rng: np.random.Generator, folder: Path
) -> dict[str, Any]:
    """Write ``count`` canvases into ``folder``; the COCO ``images``/``annotations`` lists."""
    folder.mkdir(parents=True, exist_ok=True)
    size = spec.canvas_size
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        canvas = np.zeros((size, size), dtype=np.uint8)
        boxes: list[tuple[int, int, int, int]] = []
        wanted = int(rng.integers(spec.min_items, spec.max_items + 1))
        attempts = 0
        while len(boxes) < wanted and attempts < 50 * wanted:
            attempts += 1
            source = int(rng.integers(len(images)))
            side = round(28 * rng.uniform(spec.min_scale, spec.max_scale))
            item = np.asarray(Image.fromarray(images[source]).resize((side, side), Image.BILINEAR))
            rows = np.flatnonzero((item > _VISIBLE).any(axis=1))
            cols = np.flatnonzero((item > _VISIBLE).any(axis=0))
            if rows.size == 0:
                continue
            x, y = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
            box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
            if any(_overlap(box, other) > spec.max_overlap for other in boxes):
                continue
            # max, not overwrite: an item never blanks the visible part of an earlier one
            np.maximum(canvas[y : y + side, x : x + side], item, out=canvas[y : y + side, x : x + side])
            boxes.append(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(labels[source]) + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": (box[2] - box[0]) * (box[3] - box[1]),
                    "iscrowd": 0,
                }
            )
        name = f"{index:06d}.png"
        Image.fromarray(canvas).save(folder / name, optimize=False)
        coco_images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
    return {"images": coco_images, "annotations": annotations}


def _remove_stale_canvases(folder: Path, count: int) -> None:
    """Remove the canvases ``NNNNNN.png`` numbered ``count`` and up that an earlier, larger set left."""
    for path in folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        if int(path.stem) >= count:
            path.unlink()


def make_fashion_mnist_detection(
    out: str | Path,
    spec: CanvasSpec = CanvasSpec(),
    *,
    root: str | Path = DEFAULT_FASHION_MNIST_ROOT,
    download: bool = False,
) -> dict[str, Path]:
    """Write the training and validation canvases and their COCO instances JSON under ``out``.

    Returns the paths ``{"train_images", "train_annotations", "val_images", "val_annotations"}``.
    Category ids are 1..10 in Fashion-MNIST's class order (0 is COCO's "no category").
    """
    out = Path(out)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]
    paths: dict[str, Path] = {}
    for split, train, count, stream in (("train", True, spec.train_count, 0), ("val", False, spec.val_count, 1)):
        data = fashion_mnist_dataset(root, train=train, download=download)
        annotation_path = out / "annotations" / f"instances_{split}.json"
        # Rewriting a set (``gex detect data --overwrite``): its JSON goes first, so that an interrupted
        # run never leaves the earlier boxes naming new images; it is written whole once they are.
        annotation_path.unlink(missing_ok=True)
        rng = np.random.default_rng([spec.seed, stream])
        content = _split(data.data.numpy(), data.targets.numpy(), count, spec, rng, out / split)
        coco = {
            "info": {
                "description": f"Fashion-MNIST {'training' if train else 'test'} items on canvases",
                "spec": {**spec.__dict__},
            },
            "images": content["images"],
            "annotations": content["annotations"],
            "categories": categories,
        }
        write_json(coco, annotation_path, indent=1)
        _remove_stale_canvases(out / split, count)
        paths[f"{split}_images"], paths[f"{split}_annotations"] = out / split, annotation_path
    return paths
