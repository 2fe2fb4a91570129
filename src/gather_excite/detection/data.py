"""COCO-format detection folders through ``torchvision.datasets.CocoDetection`` and ``transforms.v2``.

An instances JSON is checked once when a split is opened: the COCO keys exist, every listed
image file exists, and every box lies inside its image with a positive width and height.
A bad box is refused naming its annotation id (``invalid_boxes="refuse"``, the default) or
dropped with one printed count (``invalid_boxes="drop"``, as torchvision's references do on
COCO, whose 2014 release has a few zero-size boxes). Crowd annotations are kept for the
evaluation (COCO's protocol ignores detections matched to them) and dropped from training.
Category ids may be any positive ints: they map to contiguous labels 1..K (0 is the
background) in the order of the JSON's ``categories``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from ..errors import ConfigError, DataError, DataNotFoundError

__all__ = ["CocoDetectionData", "check_coco_instances", "collate_detection"]

InvalidBoxes = Literal["refuse", "drop"]
_REQUIRED = {
    "": ("images", "annotations", "categories"),
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "bbox", "category_id"),
    "categories": ("id", "name"),
}
# COCO boxes are floats and a few end a fraction of a pixel past the border; that is rounding,
# not an out-of-image box (the transforms clamp it).
_BORDER_TOLERANCE = 1.0


def _missing(entry: Any, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if not isinstance(entry, dict) or key not in entry]


def check_coco_instances(
    annotations: str | Path, images: str | Path, *, invalid_boxes: InvalidBoxes = "refuse"
) -> tuple[dict[str, Any], list[int]]:
    """The parsed instances JSON and the ids of the annotations to drop; raises ``ValueError`` on bad input.

    Checks the top-level keys and those of every image, annotation and category (naming the
    missing ones), that every image file exists under ``images``, and every box (COCO
    ``[x, y, width, height]``) is non-degenerate and inside its image.
    """
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise DataNotFoundError(f"instances JSON {str(annotations)!r} does not exist")
    if not images.is_dir():
        raise DataNotFoundError(f"image folder {str(images)!r} does not exist")
    try:
        coco = json.loads(annotations.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"instances JSON {str(annotations)!r} is not JSON: {err}") from None
    missing = _missing(coco, _REQUIRED[""])
    if missing:
        raise DataError(f"instances JSON {str(annotations)!r} is not COCO: missing keys {missing}")
    for group in ("images", "annotations", "categories"):
        if not isinstance(coco[group], list):
            raise DataError(f"instances JSON {str(annotations)!r} is not COCO: {group!r} must be a list")
        for entry in coco[group]:
            missing = _missing(entry, _REQUIRED[group])
            if missing:
                raise DataError(
                    f"instances JSON {str(annotations)!r} is not COCO: an entry of {group!r} misses keys {missing} "
                    f"({str(entry)[:80]})"
                )
    if not coco["categories"]:
        raise DataError(f"instances JSON {str(annotations)!r} lists no categories")
    sizes = {}
    for image in coco["images"]:
        if not (images / image["file_name"]).is_file():
            raise DataNotFoundError(
                f"image {image['file_name']!r} (id {image['id']}) listed in {str(annotations)!r} "
                f"is missing from {str(images)!r}"
            )
        sizes[image["id"]] = (float(image["width"]), float(image["height"]))
    category_ids = {category["id"] for category in coco["categories"]}
    dropped = []
    for annotation in coco["annotations"]:
        if annotation["image_id"] not in sizes:
            raise DataError(f"annotation id {annotation['id']} names image_id {annotation['image_id']}, not listed")
        if annotation["category_id"] not in category_ids:
            raise DataError(
                f"annotation id {annotation['id']} names category_id {annotation['category_id']}, not in categories"
            )
        x, y, w, h = (float(v) for v in annotation["bbox"])
        width, height = sizes[annotation["image_id"]]
        degenerate = w <= 0 or h <= 0
        outside = x < -_BORDER_TOLERANCE or y < -_BORDER_TOLERANCE
        outside = outside or x + w > width + _BORDER_TOLERANCE or y + h > height + _BORDER_TOLERANCE
        if degenerate or outside:
            if invalid_boxes == "refuse":
                what = "is degenerate" if degenerate else f"lies outside its {width:g}x{height:g} image"
                raise DataError(
                    f"annotation id {annotation['id']} in {str(annotations)!r}: box {annotation['bbox']} {what} "
                    f"(set data.invalid_boxes: drop to skip such boxes)"
                )
            dropped.append(int(annotation["id"]))
    return coco, dropped


class _CocoTargets:
    """``(image, target)`` from the v2 wrapper -> plain ``boxes`` (x1y1x2y2) and contiguous ``labels``.

    Images without annotations get empty boxes; crowd annotations go in training (COCOeval
    reads them from its own ground truth in evaluation).
    """

    def __init__(self, label_of: dict[int, int], *, train: bool) -> None:
        self.label_of, self.train = label_of, train

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        height, width = v2.functional.get_size(image)
        boxes = target.get("boxes")
        if boxes is None:
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
            labels, crowd = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
        else:
            labels = torch.as_tensor([self.label_of[int(c)] for c in target["labels"]], dtype=torch.int64)
            crowd = torch.as_tensor(target["iscrowd"], dtype=torch.bool)
        keep = ~crowd if self.train else torch.ones_like(crowd)
        return image, {
            "boxes": v2.functional.clamp_bounding_boxes(tv_tensors.wrap(boxes[keep], like=boxes)),
            "labels": labels[keep],
            "image_id": int(target["image_id"]),
        }


class _DetectorResize:
    """Resize an image and its boxes by torchvision's detector rule (shorter side ``min_size``, longer <= ``max_size``).

    ``v2.Resize(min_size, max_size=...)`` needs ``max_size > min_size``; square inputs with
    equal sizes are the common small-data case, so the rule of ``GeneralizedRCNNTransform``
    is applied directly (the detector then finds nothing left to resize).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        height, width = v2.functional.get_size(image)
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        size = [int(height * scale), int(width * scale)]
        if size == [height, width]:
            return image, target
        return v2.functional.resize(image, size, antialias=True), {
            **target,
            "boxes": v2.functional.resize(target["boxes"], size),
        }


class _PlainTensors:
    """Unwrap tv_tensors so that the detector and Lightning see plain tensors."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return image.as_subclass(torch.Tensor), {
            **target,
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
        }


def collate_detection(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Detection batches are lists: images differ in size, targets in box count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class CocoDetectionData(L.LightningDataModule):
    """Training and validation splits of a COCO-format detection set.

    Args:
        root: the folder that the four paths below are relative to.
        train_images, train_annotations, val_images, val_annotations: image folders and
            instances JSONs (COCO 2014: ``train2014``, ``annotations/instances_train2014.json``, ...).
        batch_size: global training batch size (split over the processes).
        eval_batch_size: per-process evaluation batch size (default: ``batch_size``).
        num_workers: data loader processes per training process.
        min_size, max_size: training images are resized so that the shorter side is
            ``min_size`` unless the longer would exceed ``max_size`` (the detector resizes
            evaluation images the same way and maps the boxes back).
        hflip: probability of a horizontal flip of a training image (and its boxes).
        invalid_boxes: ``"refuse"`` a degenerate or out-of-image box (naming its annotation
            id) or ``"drop"`` it (printing the count).
        val_subset: evaluate on the first N validation images only.
    """

    def __init__(
        self,
        root: str = "data/coco",
        *,
        train_images: str = "train",
        train_annotations: str = "annotations/instances_train.json",
        val_images: str = "val",
        val_annotations: str = "annotations/instances_val.json",
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        min_size: int = 800,
        max_size: int = 1333,
        hflip: float = 0.5,
        invalid_boxes: InvalidBoxes = "refuse",
        val_subset: int | None = None,
    ) -> None:
        super().__init__()
        if invalid_boxes not in ("refuse", "drop"):
            raise ConfigError(f"invalid_boxes must be 'refuse' or 'drop', got {invalid_boxes!r}")
        for name, value in (("batch_size", batch_size), ("min_size", min_size), ("max_size", max_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 <= hflip <= 1:
            raise ConfigError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None

    def _paths(self, split: str) -> tuple[Path, Path]:
        hp = self.hparams
        return self.root / hp[f"{split}_images"], self.root / hp[f"{split}_annotations"]

    @cached_property
    def categories(self) -> list[dict[str, Any]]:
        """The training JSON's categories as ``[{"id": ..., "name": ...}]``: label i+1 is entry i."""
        images, annotations = self._paths("train")
        coco, _ = check_coco_instances(annotations, images, invalid_boxes="drop")
        return [{"id": int(c["id"]), "name": str(c["name"])} for c in coco["categories"]]

    def _dataset(self, split: str, categories: list[dict[str, Any]]) -> Dataset[Any]:
        images, annotations = self._paths(split)
        coco, dropped = check_coco_instances(annotations, images, invalid_boxes=self.hparams["invalid_boxes"])
        if dropped:
            print(f"{annotations}: dropped {len(dropped)} degenerate or out-of-image boxes", file=sys.stderr)
        label_of = {category["id"]: index + 1 for index, category in enumerate(categories)}
        unknown = sorted({int(c["id"]) for c in coco["categories"]} - set(label_of))
        if unknown:
            raise DataError(f"{annotations}: category ids {unknown} are not among the model's {sorted(label_of)}")
        train = split == "train"
        steps: list[Any] = [v2.ToImage(), _CocoTargets(label_of, train=train)]
        if train:
            steps += [
                v2.RandomHorizontalFlip(self.hparams["hflip"]),
                _DetectorResize(self.hparams["min_size"], self.hparams["max_size"]),
            ]
        steps += [v2.ToDtype(torch.float32, scale=True), _PlainTensors()]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading times
            dataset = CocoDetection(str(images), str(annotations), transforms=v2.Compose(steps))
            if dropped:
                # One index without the dropped boxes serves training, evaluation and COCOeval.
                gone = set(dropped)
                dataset.coco.dataset["annotations"] = [
                    a for a in dataset.coco.dataset["annotations"] if a["id"] not in gone
                ]
                dataset.coco.createIndex()
        return wrap_dataset_for_transforms_v2(dataset, target_keys={"boxes", "labels", "image_id", "iscrowd"})

    def setup(self, stage: str | None = None, categories: list[dict[str, Any]] | None = None) -> None:
        categories = categories or self.categories
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train", categories)
        if self.val_set is None:
            val_set = self._dataset("val", categories)
            subset = self.hparams["val_subset"]
            self.val_set = Subset(val_set, range(min(subset, len(val_set)))) if subset else val_set

    @property
    def val_coco(self) -> Any:
        """The pycocotools ``COCO`` object of the validation JSON (the ground truth of COCOeval)."""
        dataset = self.val_set.dataset if isinstance(self.val_set, Subset) else self.val_set
        return dataset.coco  # type: ignore[union-attr]

    def _loader(self, dataset: Dataset[Any], batch_size: int, *, shuffle: bool) -> DataLoader[Any]:
        workers = self.hparams["num_workers"]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=collate_detection,
            persistent_workers=workers > 0,
        )

    def _per_process(self, batch_size: int) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if batch_size % world:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {world} processes")
        return batch_size // world

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.train_set is not None
        return self._loader(self.train_set, self._per_process(self.hparams["batch_size"]), shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        assert self.val_set is not None
        return self._loader(self.val_set, self.hparams["eval_batch_size"] or self.hparams["batch_size"], shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self.val_dataloader()
