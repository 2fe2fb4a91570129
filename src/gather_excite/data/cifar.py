"""CIFAR-10/100 through torchvision's loaders (the ``cifar-10-batches-py`` / ``cifar-100-python`` pickles)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision.datasets import CIFAR10, CIFAR100

__all__ = ["CIFAR10Files", "CIFAR100Files", "cifar_dataset"]


class _PresenceCheckMixin:
    """Accept batch files that exist without matching the official checksums (subsets, re-packed copies).

    torchvision verifies MD5 sums of every batch on each construction; the download still does.
    """

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def _check_integrity(self) -> bool:
        split = self.train_list if getattr(self, "train", True) else self.test_list
        files = [name for name, _ in split] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name in files)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as handle:
            self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}


class CIFAR10Files(_PresenceCheckMixin, CIFAR10):
    """torchvision's CIFAR-10 that checks the batch files exist rather than their checksums."""


class CIFAR100Files(_PresenceCheckMixin, CIFAR100):
    """torchvision's CIFAR-100 that checks the batch files exist rather than their checksums."""


def cifar_dataset(
    root: str | Path,
    *,
    num_classes: int,
    train: bool,
    transform: Callable[..., Any] | None = None,
    download: bool = False,
) -> CIFAR10 | CIFAR100:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 from ``ROOT/cifar-10-batches-py`` or ``ROOT/cifar-100-python``."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes!r}")
    cls = CIFAR10Files if num_classes == 10 else CIFAR100Files
    root = Path(root).expanduser()
    folder = root / cls.base_folder
    if not download and not folder.is_dir():
        raise FileNotFoundError(
            f"data path {str(root)!r} holds no CIFAR-{num_classes} batches: expected the folder {str(folder)!r} "
            f"(the python version of the dataset, as torchvision downloads it); pass download=True "
            f"(--data.download true) to fetch it"
        )
    try:
        return cls(str(root), train=train, transform=transform, download=download)
    except RuntimeError as err:
        split = cls.train_list if train else cls.test_list
        names = ", ".join(name for name, _ in split) + f", {cls.meta['filename']}"
        raise FileNotFoundError(f"{str(folder)!r} lacks CIFAR-{num_classes} files: expected {names} ({err})") from None
