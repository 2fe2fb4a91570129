"""COCO-format detection folders through ``torchvision.datasets.CocoDetection`` and ``transforms.v2``.

An instances JSON is checked once when a split is opened (``check_coco_instances``), before any
training, and every fault is one line naming the file and the entry: the COCO keys exist
(annotations need ``area`` and ``iscrowd``, which COCOeval and torchvision's wrapper read), the
values have COCO's types (int ids, positive ``width``/``height``, a ``bbox`` of 4 finite numbers,
a numeric ``area``, ``iscrowd`` 0/1), no image, annotation or category id is repeated
(pycocotools indexes them by id, so a repeated annotation id would swap one image's boxes for
another's), every annotation names a listed image and category, every box lies inside its image
with a positive width and height (also once clamped to the image), and every listed image file
exists, opens as JPEG, PNG, BMP, TIFF or WebP (Pillow tries no other format: a data folder never
runs code), and has the JSON's size (read from its header, no pixels decoded; a mismatch means
the folder belongs to another JSON, whose boxes would be clamped silently).
A bad box is refused naming its annotation id (``invalid_boxes="refuse"``, the default) or
dropped from training with one printed count (``invalid_boxes="drop"``, as torchvision's
references do on COCO, whose 2014 release has a few zero-size boxes); COCOeval's ground truth
is the validation JSON as given either way. Crowd annotations are kept for the
evaluation (COCO's protocol ignores detections matched to them) and dropped from training.
Category ids may be any positive ints: they map to contiguous labels 1..K (0 is the
background) in the order of the JSON's ``categories``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from ..data.images import IMAGE_FORMATS, open_image
from ..errors import ConfigError, DataError, DataNotFoundError

__all__ = ["CocoDetectionData", "check_coco_instances", "collate_detection"]

InvalidBoxes = Literal["refuse", "drop"]
_REQUIRED = {
    "": ("images", "annotations", "categories"),
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "bbox", "category_id", "area", "iscrowd"),
    "categories": ("id", "name"),
}
_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}
# COCO boxes are floats and a few end a fraction of a pixel past the border; that is rounding,
# not an out-of-image box (the transforms clamp it).
_BORDER_TOLERANCE = 1.0
_DROP_HINT = "(data.invalid_boxes: drop, or gex detect eval --invalid-boxes drop, skips such boxes)"


def _missing(entry: Any, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if not isinstance(entry, dict) or key not in entry]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or float that is finite (JSON's ``NaN``/``Infinity`` and ints beyond a float's range are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _entry(group: str, entry: dict[str, Any]) -> str:
    """How a message names an entry: by its id once that is known to be an int, else by its start."""
    if _is_int(entry["id"]):
        return f"{_SINGULAR[group]} id {entry['id']}"
    return f"an entry of {group!r} ({str(entry)[:80]})"


def check_coco_instances(
    annotations: str | Path, images: str | Path, *, invalid_boxes: InvalidBoxes = "refuse"
) -> tuple[dict[str, Any], list[int]]:
    """The parsed instances JSON and the ids of the annotations to drop; raises a one-line ``DataError`` on bad input.

    Every message names the JSON (or the image file) and the entry at fault. Checked, in order:

    - the top-level keys and those of every image, annotation and category (naming the missing
      ones; annotations need ``area`` and ``iscrowd`` too, which COCOeval and torchvision's
      wrapper read);
    - the values: ids (and an annotation's ``image_id`` and ``category_id``) are ints, not
      bools; ``file_name`` a string; ``width``/``height`` positive numbers; ``bbox`` a list of 4
      finite numbers; ``area`` a finite number; ``iscrowd`` 0 or 1 (or a bool);
    - that no image, annotation or category id is repeated (pycocotools indexes each by id: a
      repeated annotation id makes one image's boxes stand in for another's, in training and in
      COCOeval's ground truth);
    - that every annotation names a listed image and category;
    - that every box (COCO ``[x, y, width, height]``) is non-degenerate and inside its image
      (within ``_BORDER_TOLERANCE`` px), and still non-degenerate once clamped to the image as
      the training transform does: refused naming its annotation id, or returned in the drop
      list with ``invalid_boxes="drop"``;
    - that every image file exists under ``images``, opens as one of :data:`IMAGE_FORMATS`, and
      has the JSON's ``width`` x ``height`` (read from the file's header: no pixels are decoded).
    """
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise DataNotFoundError(f"instances JSON {str(annotations)!r} does not exist")
    if not images.is_dir():
        raise DataNotFoundError(f"image folder {str(images)!r} does not exist")
    name = repr(str(annotations))
    try:
        coco = json.loads(annotations.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"instances JSON {name} is not JSON: {err}") from None
    missing = _missing(coco, _REQUIRED[""])
    if missing:
        raise DataError(f"instances JSON {name} is not COCO: missing keys {missing}")
    for group in ("images", "annotations", "categories"):
        if not isinstance(coco[group], list):
            raise DataError(f"instances JSON {name} is not COCO: {group!r} must be a list")
        seen: dict[int, dict[str, Any]] = {}
        for entry in coco[group]:
            missing = _missing(entry, _REQUIRED[group])
            if missing:
                raise DataError(
                    f"instances JSON {name} is not COCO: an entry of {group!r} misses keys {missing} "
                    f"({str(entry)[:80]})"
                )
            if not _is_int(entry["id"]):
                raise DataError(f"{_entry(group, entry)} in {name}: id {_short(entry['id'])} is not an int")
            first = seen.setdefault(entry["id"], entry)
            if first is not entry:
                # pycocotools keeps the last entry of an id: the others vanish from its index
                what = {"images": "file_name", "annotations": "image_id", "categories": "name"}[group]
                both = f" ({what} {_short(first[what])} and {_short(entry[what])})"
                raise DataError(
                    f"{_SINGULAR[group]} id {entry['id']} is repeated in {name}{both}; "
                    f"pycocotools indexes {group} by id, so ids must be unique"
                )
    if not coco["categories"]:
        raise DataError(f"instances JSON {name} lists no categories")

    def bad(group: str, entry: dict[str, Any], key: str, expected: str) -> DataError:
        return DataError(f"{_entry(group, entry)} in {name}: {key} {_short(entry[key])} is not {expected}")

    sizes = {}
    for image in coco["images"]:
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise bad("images", image, "file_name", "a file name")
        for key in ("width", "height"):
            if not _is_number(image[key]) or image[key] <= 0:
                raise bad("images", image, key, "a positive number")
        sizes[image["id"]] = (image["width"], image["height"])
    category_ids = {category["id"] for category in coco["categories"]}
    dropped = []
    for annotation in coco["annotations"]:
        for key in ("image_id", "category_id"):
            if not _is_int(annotation[key]):
                raise bad("annotations", annotation, key, "an int")
        box = annotation["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise bad("annotations", annotation, "bbox", "a list of 4 finite numbers [x, y, width, height]")
        if not _is_number(annotation["area"]):
            raise bad("annotations", annotation, "area", "a finite number")
        if not isinstance(annotation["iscrowd"], int) or annotation["iscrowd"] not in (0, 1):  # a bool is an int
            raise bad("annotations", annotation, "iscrowd", "0 or 1")
        if annotation["image_id"] not in sizes:
            raise DataError(
                f"annotation id {annotation['id']} in {name} names image_id {annotation['image_id']}, not listed"
            )
        if annotation["category_id"] not in category_ids:
            raise DataError(
                f"annotation id {annotation['id']} in {name} names category_id {annotation['category_id']}, "
                "not in categories"
            )
        x, y, w, h = box
        width, height = sizes[annotation["image_id"]]
        degenerate = w <= 0 or h <= 0
        outside = x < -_BORDER_TOLERANCE or y < -_BORDER_TOLERANCE
        outside = outside or x + w > width + _BORDER_TOLERANCE or y + h > height + _BORDER_TOLERANCE
        # The training transform clamps boxes to the image (the tolerance above): a box within it
        # can still end with no width or height there, which FasterRCNN refuses mid-training.
        clamped = min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0)
        if degenerate or outside or clamped:
            if invalid_boxes == "refuse":
                what = "is degenerate" if degenerate else f"lies outside its {width:g}x{height:g} image"
                if not (degenerate or outside):
                    what = f"is degenerate once clamped to its {width:g}x{height:g} image"
                raise DataError(f"annotation id {annotation['id']} in {name}: box {_short(box)} {what} {_DROP_HINT}")
            dropped.append(annotation["id"])
    for image in coco["images"]:
        path = images / image["file_name"]
        listed = f"image {image['file_name']!r} (id {image['id']})"
        if not path.is_file():
            raise DataNotFoundError(f"{listed} listed in {name} is missing from {str(images)!r}")
        try:
            with open_image(path) as opened:  # reads the header only
                real = opened.size
        except (OSError, Image.DecompressionBombError) as err:
            reason = " ".join(str(err).split())
            raise DataError(
                f"{listed} in {str(images)!r}, listed in {name}, is not a readable image in an accepted format "
                f"({', '.join(IMAGE_FORMATS)}): {reason}"
            ) from None
        width, height = sizes[image["id"]]
        if real != (width, height):
            raise DataError(
                f"{listed} in {str(images)!r} is {real[0]}x{real[1]} pixels but {name} gives {width:g}x{height:g} "
                "(width x height): the image folder does not match the JSON"
            )
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


class _CocoImages(CocoDetection):
    """``CocoDetection`` whose images open in :data:`IMAGE_FORMATS` only (torchvision's loader takes any format)."""

    def _load_image(self, id: int) -> Image.Image:
        path = Path(self.root) / self.coco.loadImgs(id)[0]["file_name"]
        try:
            with open_image(path) as image:
                return image.convert("RGB")
        except (OSError, Image.DecompressionBombError) as err:
            raise DataError(f"image {str(path)!r} is not a readable image: {' '.join(str(err).split())}") from None


def collate_detection(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Detection batches are lists: images differ in size, targets in box count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class CocoDetectionData(L.LightningDataModule):
    """Training and validation splits of a COCO-format detection set.

    Args:
        root: the folder that the four paths below are relative to.
        train_images: the folder of the training images, relative to ``root`` (COCO 2014: ``train2014``).
        train_annotations: the training split's COCO instances JSON, relative to ``root`` (COCO 2014:
            ``annotations/instances_train2014.json``); its categories become the detector's classes.
        val_images: the folder of the validation images, relative to ``root`` (COCO 2014: ``val2014``).
        val_annotations: the validation split's COCO instances JSON, relative to ``root`` (COCO 2014:
            ``annotations/instances_val2014.json``): COCOeval's ground truth.
        batch_size: global training batch size (split over the processes).
        eval_batch_size: per-process evaluation batch size (default: ``batch_size``), >= 1.
        num_workers: data loader processes per training process (0: load in the process).
        min_size: training images are resized so that their shorter side is this many pixels,
            unless the longer side would then exceed ``max_size`` (the detector resizes evaluation
            images the same way and maps the boxes back; ``gex detect train`` passes it to
            ``model.min_size``).
        max_size: the largest longer side in pixels after that resize (``gex detect train`` passes
            it to ``model.max_size``).
        hflip: probability of a horizontal flip of a training image (and its boxes).
        invalid_boxes: ``"refuse"`` a degenerate or out-of-image box (naming its annotation
            id) or ``"drop"`` it from training (printing the count); COCOeval's ground truth is
            the validation JSON as given either way.
        val_subset: evaluate on the first N (>= 1) validation images only (default: all).
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
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        # None means "all images" / "batch_size": 0 must not mean the same silently.
        for name, value in (("eval_batch_size", eval_batch_size), ("val_subset", val_subset)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{name} must be null or an int >= 1, got {value!r}")
        if not _is_int(num_workers) or num_workers < 0:
            raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not 0 <= hflip <= 1:
            raise ConfigError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self._checked: dict[tuple[Path, Path], tuple[list[dict[str, Any]], list[int]]] = {}

    def _paths(self, split: str) -> tuple[Path, Path]:
        hp = self.hparams
        return self.root / hp[f"{split}_images"], self.root / hp[f"{split}_annotations"]

    def _check(self, split: str, invalid_boxes: InvalidBoxes) -> tuple[list[dict[str, Any]], list[int]]:
        """``check_coco_instances`` of a split, run once per JSON and image folder: its categories and drop list.

        The check reads every image's header; ``categories`` (at instantiation) and the training
        split (in ``setup``) would otherwise both run it on the training JSON. Only the small
        results are kept, not the parsed JSON.
        """
        images, annotations = self._paths(split)
        key = (annotations.resolve(), images.resolve())
        if key not in self._checked:
            coco, dropped = check_coco_instances(annotations, images, invalid_boxes="drop")
            self._checked[key] = (coco["categories"], dropped)
        categories, dropped = self._checked[key]
        if dropped and invalid_boxes == "refuse":
            check_coco_instances(annotations, images, invalid_boxes="refuse")  # raises, naming the first bad box
        return categories, dropped

    @cached_property
    def categories(self) -> list[dict[str, Any]]:
        """The training JSON's categories as ``[{"id": ..., "name": ...}]``: label i+1 is entry i."""
        categories, _ = self._check("train", "drop")
        return [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]

    def _dataset(self, split: str, categories: list[dict[str, Any]]) -> Dataset[Any]:
        images, annotations = self._paths(split)
        json_categories, dropped = self._check(split, self.hparams["invalid_boxes"])
        train = split == "train"
        if dropped:
            count = f"{len(dropped)} degenerate or out-of-image boxes"
            what = f"dropped {count} from training" if train else f"kept {count} in COCOeval's ground truth"
            print(f"{annotations}: {what}", file=sys.stderr)
        label_of = {category["id"]: index + 1 for index, category in enumerate(categories)}
        unknown = sorted({int(c["id"]) for c in json_categories} - set(label_of))
        if unknown:
            raise DataError(f"{annotations}: category ids {unknown} are not among the model's {sorted(label_of)}")
        steps: list[Any] = [v2.ToImage(), _CocoTargets(label_of, train=train)]
        if train:
            steps += [
                v2.RandomHorizontalFlip(self.hparams["hflip"]),
                _DetectorResize(self.hparams["min_size"], self.hparams["max_size"]),
            ]
        steps += [v2.ToDtype(torch.float32, scale=True), _PlainTensors()]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading times
            dataset = _CocoImages(str(images), str(annotations), transforms=v2.Compose(steps))
            if dropped and train:
                # Dropped from what training sees only: the validation index is COCOeval's ground
                # truth, which must be the JSON as given (torchvision's references do the same).
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
