"""The paper's augmentation and evaluation transforms (torchvision ``transforms.v2``), one builder per recipe."""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms import v2

__all__ = ["DATASET_STATS", "Recipe", "build_normalized_augment", "build_transform"]

Recipe = Literal["imagenet", "cifar", "fashion_mnist"]

# Per-channel mean/std of each dataset's training images (pixel values in [0, 1]).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


def build_transform(
    recipe: Recipe,
    *,
    train: bool,
    stats: str,
    crop_size: int,
    resize_size: int | None = None,
    augment: bool = True,
) -> v2.Compose:
    """The train or eval transform of a recipe; takes a PIL image or a uint8 CHW tensor, returns float CHW.

    Args:
        recipe: ``"imagenet"`` (Section 3: random-resized ``crop_size`` crop + flip for training; resize
            to ``resize_size`` and a single centre ``crop_size`` crop for evaluation), ``"cifar"``
            (Table 5: pad 4, random ``crop_size`` crop, flip) or ``"fashion_mnist"`` (pad 2, random crop,
            flip; 28x28 images).
        stats: key of :data:`DATASET_STATS` for the mean/std normalisation.
        augment: ``False`` gives the evaluation transform for training too (no random crops or flips).
    """
    if recipe not in ("imagenet", "cifar", "fashion_mnist"):
        raise ValueError(f"recipe must be 'imagenet', 'cifar' or 'fashion_mnist', got {recipe!r}")
    if stats not in DATASET_STATS:
        raise ValueError(f"stats must be one of {sorted(DATASET_STATS)}, got {stats!r}")
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
        raise ValueError(f"crop_size must be an int >= 1, got {crop_size!r}")
    mean, std = DATASET_STATS[stats]
    steps: list[v2.Transform] = [v2.ToImage()]
    if recipe == "imagenet":
        resize = resize_size if resize_size is not None else round(crop_size * 256 / 224)
        if train and augment:
            steps += [v2.RandomResizedCrop(crop_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [v2.Resize(resize, antialias=True), v2.CenterCrop(crop_size)]
    elif train and augment:
        padding = 4 if recipe == "cifar" else 2
        steps += [v2.RandomCrop(crop_size, padding=padding), v2.RandomHorizontalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def build_normalized_augment(*, stats: str, crop_size: int, padding: int) -> v2.Compose:
    """Random crop (zero-padded in pixel space) and flip of an already normalised float CHW tensor."""
    if stats not in DATASET_STATS:
        raise ValueError(f"stats must be one of {sorted(DATASET_STATS)}, got {stats!r}")
    mean, std = DATASET_STATS[stats]
    # A black (0) pixel after normalisation, so padding matches padding the raw image.
    black = [-m / s for m, s in zip(mean, std, strict=True)]
    return v2.Compose(
        [
            v2.RandomCrop(crop_size, padding=padding, fill=black[0] if len(black) == 1 else black),
            v2.RandomHorizontalFlip(),
        ]
    )
