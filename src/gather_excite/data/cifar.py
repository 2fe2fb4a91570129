"""CIFAR-10/100 from torchvision's ``cifar-10-batches-py`` / ``cifar-100-python`` pickles, read without running code.

The batch files are pickles, and ``pickle.load`` runs whatever a crafted file names. They are read
here with an unpickler that admits only what the official files hold (dicts, lists, str/bytes,
numbers and numpy arrays), then checked for the batch layout; anything else is refused with one
line naming the file.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.vision import VisionDataset

from ..errors import DataError, DataNotFoundError, UnsafeFileError
from ._download import download_errors

__all__ = ["CIFAR10Files", "CIFAR100Files", "cifar_dataset", "read_cifar_pickle"]

# The globals a CIFAR pickle needs: numpy's array and dtype reconstructors (pre- and post-2.0
# module names; protocol 5 uses _frombuffer) and _codecs.encode, by which protocol 2 stores bytes.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
_PIXELS = 3 * 32 * 32


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeFileError(f"{module}.{name}")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict of a CIFAR batch or meta file; only plain data and numpy arrays are admitted.

    Raises :class:`~gather_excite.errors.UnsafeFileError` when the file names any other callable
    (nothing is called) and :class:`~gather_excite.errors.DataError` when it is not a readable pickle
    of a dict.
    """
    try:
        with open(path, "rb") as handle:
            # latin1 reads the Python 2 str of the official files as str (torchvision does the same).
            loaded = _DataOnlyUnpickler(handle, encoding="latin1").load()
    except UnsafeFileError as err:
        raise UnsafeFileError(
            f"CIFAR file {str(path)!r} asks to call {err} while unpickling; a CIFAR batch holds only "
            f"numpy arrays, lists and strings, so it was not loaded (replace the file with the official one)"
        ) from None
    # Any of these means the bytes are not a well-formed pickle; none of them ran code.
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, struct.error, UnicodeDecodeError) as err:  # fmt: skip
        raise DataError(
            f"CIFAR file {str(path)!r} is not a readable batch file (truncated or corrupt: {err})"
        ) from None
    if not isinstance(loaded, dict):
        raise DataError(f"CIFAR file {str(path)!r} holds a {type(loaded).__name__}, expected a dict")
    return loaded


def _read_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    entry = read_cifar_pickle(path)
    data, labels = entry.get("data"), entry.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR file {path!r}: 'data' must be a uint8 array (N, {_PIXELS}), got {what}")
    if (
        not isinstance(labels, list)
        or len(labels) != data.shape[0]
        or not all(isinstance(label, int) and 0 <= label < num_classes for label in labels)
    ):
        raise DataError(f"CIFAR file {path!r}: {label_key!r} must list {data.shape[0]} ints in [0, {num_classes})")
    return data, labels


class _CIFARFiles:
    """torchvision's CIFAR dataset that reads its pickles with :func:`read_cifar_pickle`.

    Batch files are accepted when present rather than when they match the official checksums
    (subsets, re-packed copies); the download still verifies what it fetches.
    """

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]
    label_key = "labels"
    num_classes = 10

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable[..., Any] | None = None,
        target_transform: Callable[..., Any] | None = None,
        download: bool = False,
    ) -> None:
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)  # type: ignore[arg-type]
        self.train = train
        if download:
            self.download()  # type: ignore[attr-defined]
        folder = os.path.join(self.root, self.base_folder)
        names = [name for name, _ in (self.train_list if train else self.test_list)]
        missing = [name for name in [*names, self.meta["filename"]] if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise DataNotFoundError(
                f"{folder!r} lacks CIFAR-{self.num_classes} files {', '.join(missing)}; let torchvision "
                f"fetch the dataset (download=True)"
            )
        batches = [_read_batch(os.path.join(folder, name), self.label_key, self.num_classes) for name in names]
        self.data = np.vstack([data for data, _ in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for _, labels in batches for label in labels]
        self._load_meta()

    def _check_integrity(self) -> bool:
        split = self.train_list if getattr(self, "train", True) else self.test_list
        files = [name for name, _ in split] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name in files)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        classes = read_cifar_pickle(path).get(self.meta["key"])
        if not isinstance(classes, list) or len(classes) != self.num_classes:
            raise DataError(f"CIFAR file {path!r}: {self.meta['key']!r} must list {self.num_classes} class names")
        self.classes = [str(name) for name in classes]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}


class CIFAR10Files(_CIFARFiles, CIFAR10):
    """torchvision's CIFAR-10 read without running code, checking that the batch files exist."""


class CIFAR100Files(_CIFARFiles, CIFAR100):
    """torchvision's CIFAR-100 read without running code, checking that the batch files exist."""

    label_key = "fine_labels"
    num_classes = 100


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
        raise DataNotFoundError(
            f"data path {str(root)!r} holds no CIFAR-{num_classes} batches: expected the folder {str(folder)!r} "
            f"(the python version of the dataset, as torchvision downloads it); let torchvision fetch it "
            f"(download=True)"
        )
    if not download:
        return cls(str(root), train=train, transform=transform, download=False)
    with download_errors(root, f"CIFAR-{num_classes}"):
        return cls(str(root), train=train, transform=transform, download=True)
