"""Fashion-MNIST from the original IDX files (gzipped or not), e.g. Debian's ``/usr/share/datasets/fashion-mnist``."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from .._atomic import atomic_write
from ..errors import DataError, DataNotFoundError, describe
from ._download import download_errors
from .transforms import DATASET_STATS

__all__ = ["DEFAULT_FASHION_MNIST_ROOT", "FASHION_MNIST_CLASSES", "IDXImageDataset", "fashion_mnist_dataset"]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = tuple(FashionMNIST.classes)
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IDXImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images ``(N, H, W)`` uint8 and labels held in memory; items are ``(transform(image), label)``.

    With ``mean``/``std`` the whole split is converted once to normalised float32 ``(N, 1, H, W)``
    (the deterministic part of every recipe), so an item costs an index and the optional random
    ``transform`` only; otherwise items are uint8 ``(1, H, W)`` tensors for ``transform``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: tuple[str, ...],
        transform: Callable[[torch.Tensor], Any] | None = None,
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        if images.dim() != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor (N, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must hold one label per image, got {labels.shape[0]} for {images.shape[0]}")
        if (mean is None) != (std is None):
            raise ValueError(f"mean and std must be given together, got mean={mean!r}, std={std!r}")
        self.data, self.targets, self.classes, self.transform = images, labels.long(), classes, transform
        self.inputs = images.unsqueeze(1)
        if mean is not None and std is not None:
            self.inputs = (images.unsqueeze(1).float().div_(255) - mean) / std

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.inputs[index]
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])

    def with_transform(self, transform: Callable[[torch.Tensor], Any] | None) -> IDXImageDataset:
        """The same images and labels (shared, not copied) with another ``transform``."""
        clone = object.__new__(IDXImageDataset)
        clone.__dict__.update(self.__dict__)
        clone.transform = transform
        return clone


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gather_excite" / "idx"


def _find(root: Path, name: str) -> Path | None:
    """The IDX file ``name`` (or ``name.gz``) in ROOT or ROOT/FashionMNIST/raw (torchvision's layout)."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _uncompressed(path: Path) -> Path:
    """``path`` itself, or its decompressed copy in the user cache (written atomically, reused)."""
    if path.suffix != ".gz":
        return path
    # One cache folder per source file, so copies from different roots never overwrite each other.
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    target = _cache_dir() / key / path.stem
    if target.is_file() and target.stat().st_mtime >= path.stat().st_mtime:
        return target
    # A corrupt or cut-off .gz raises while it is read: the temporary copy is removed, nothing is cached.
    with gzip.open(path, "rb") as source, atomic_write(target, "wb") as out:
        shutil.copyfileobj(source, out)
    return target


def _reason(error: BaseException) -> str:
    """Why a file could not be read, never empty: torchvision's IDX reader checks the header with bare asserts."""
    if isinstance(error, AssertionError) and not str(error):
        return "not an IDX file (its header's magic number or dimensions are not an IDX file's)"
    return f"zlib.{describe(error)}" if isinstance(error, zlib.error) else describe(error)  # zlib's type is "error"


def _read(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    try:
        return reader(str(_uncompressed(path)))
    # OSError: also gzip's BadGzipFile; zlib.error: a damaged deflate stream inside a .gz
    except (AssertionError, TypeError, ValueError, RuntimeError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"corrupt Fashion-MNIST IDX file {str(path)!r}: {_reason(err)}") from err


def fashion_mnist_dataset(
    root: str | Path = DEFAULT_FASHION_MNIST_ROOT,
    *,
    train: bool,
    transform: Callable[[torch.Tensor], Any] | None = None,
    normalize: bool = False,
    download: bool = False,
) -> IDXImageDataset:
    """Fashion-MNIST's train (60k) or test (10k) split from the IDX files in ``root``.

    ``root`` holds ``train-images-idx3-ubyte[.gz]`` etc. directly or in torchvision's
    ``ROOT/FashionMNIST/raw``; gzipped files are decompressed once into ``~/.cache/gather_excite/idx``.
    ``download=True`` lets torchvision fetch the files into ``ROOT/FashionMNIST/raw`` when missing.
    ``normalize=True`` stores the images normalised with Fashion-MNIST's mean/std (see
    :class:`IDXImageDataset`); ``transform`` then receives float ``(1, 28, 28)`` tensors.
    """
    root = Path(root).expanduser()
    image_name, label_name = _FILES[train]
    paths = [_find(root, image_name), _find(root, label_name)]
    if None in paths and download:
        with download_errors(root, "Fashion-MNIST"):
            FashionMNIST(str(root), train=train, download=True)
        paths = [_find(root, image_name), _find(root, label_name)]
    if paths[0] is None or paths[1] is None:
        where = "does not exist" if not root.exists() else "holds no Fashion-MNIST IDX files"
        raise DataNotFoundError(
            f"data path {str(root)!r} {where}: expected {image_name}[.gz] and {label_name}[.gz] there or in "
            f"{root}/FashionMNIST/raw. Install Debian's dataset-fashion-mnist (files in "
            f"{DEFAULT_FASHION_MNIST_ROOT}) or let torchvision fetch them "
            f"(download=True)"
        )
    images = _read(paths[0], read_image_file)
    labels = _read(paths[1], read_label_file)
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"IDX files disagree: {paths[0]} holds {images.shape[0]} images but {paths[1]} {labels.shape[0]} labels"
        )
    mean, std = (
        (DATASET_STATS["fashion_mnist"][0][0], DATASET_STATS["fashion_mnist"][1][0]) if normalize else (None, None)
    )
    return IDXImageDataset(images, labels, classes=FASHION_MNIST_CLASSES, transform=transform, mean=mean, std=std)
