"""Untrusted files never run code, no run is overwritten, every user error is one line (issue 10)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from gather_excite.data import cifar_dataset
from gather_excite.errors import DataError, GexError, UnsafeFileError
from test_data import write_cifar10


class _Payload:
    """Unpickling this object calls ``exec``: what a crafted CIFAR batch would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_crafted_cifar_batch_never_runs_code(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "data", per_batch=4)
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0, 1, 0, 1]}))
    with pytest.raises(UnsafeFileError, match=rf"{batch}.*builtins\.exec") as caught:
        cifar_dataset(root, num_classes=10, train=True)
    # Refused before any code ran, with one line naming the file.
    assert not marker.exists() and "\n" not in str(caught.value)
    assert isinstance(caught.value, GexError)


def test_cifar_batches_hold_only_what_the_official_files_hold(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "data", per_batch=4)
    folder = root / "cifar-10-batches-py"
    # A protocol-2 pickle with numpy's pre-2.0 module names, as the official Python 2 files are written.
    official = pickle.dumps({"data": np.full((4, 3072), 7, np.uint8), "labels": [3, 1, 4, 1]}, protocol=2)
    (folder / "data_batch_2").write_bytes(official.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    dataset = cifar_dataset(root, num_classes=10, train=True)
    assert dataset.data[4:8].min() == dataset.data[4:8].max() == 7 and dataset.targets[4:8] == [3, 1, 4, 1]
    # A well-formed pickle whose content is not a CIFAR batch (float pixels) is refused, naming the file.
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((4, 3072)), "labels": [0] * 4}))
    with pytest.raises(DataError, match=r"data_batch_2.*uint8"):
        cifar_dataset(root, num_classes=10, train=True)
    (folder / "data_batch_2").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match=r"data_batch_2"):
        cifar_dataset(root, num_classes=10, train=True)
