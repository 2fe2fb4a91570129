"""Data layer: real JPEG folders, CIFAR pickles and IDX files written here; each bad input's message."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gather_excite.data import (
    CheckedImageFolder,
    CorruptImageError,
    ImageClassificationData,
    build_transform,
    cifar_dataset,
    fashion_mnist_dataset,
)
from gather_excite.errors import DataError

# ---------------------------------------------------------------- writers shared with test_train/test_compare


def write_image_folder(root: Path, *, per_class: int = 6, size: int = 20, splits: tuple[str, ...] = ("train", "val")):
    """Two classes of real JPEGs, dark ('a') and bright ('b') images with noise, under ROOT/<split>/<class>/."""
    rng = np.random.default_rng(0)
    for split in splits:
        for label, base in (("a", 40), ("b", 210)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}{index}.jpg", quality=95)
    return root


def write_cifar10(root: Path, *, per_batch: int = 8) -> Path:
    """torchvision's cifar-10-batches-py layout with tiny batches: class 0 dark, class 1 bright images."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(count: int) -> dict[str, object]:
        labels = [index % 2 for index in range(count)]
        data = np.stack([np.clip(40 + 170 * label + rng.normal(0, 20, 3072), 0, 255) for label in labels])
        return {"data": data.astype(np.uint8), "labels": labels}

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump(batch(per_batch), handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000_08_<ndim>, big-endian int32 dims, the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_idx(root: Path, *, train: int = 64, test: int = 32, compress: bool = True) -> Path:
    """Fashion-MNIST-format IDX files (28x28, labels 0..9); class k has mean brightness 20 + 24 k."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = np.clip(20 + 24 * labels[:, None, None] + rng.normal(0, 10, (count, 28, 28)), 0, 255)
        for kind, array in (("images-idx3", images.astype(np.uint8)), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


# ---------------------------------------------------------------- readers


def test_image_folder_reads_the_jpegs(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, per_class=3)
    dataset = CheckedImageFolder(root / "train")
    # 2 classes x 3 images; classes sorted by folder name.
    assert len(dataset) == 6 and dataset.classes == ["a", "b"]
    image, label = dataset[4]
    assert label == 1 and image.size == (20, 20)
    # JPEG is lossy; a bright image (mean 210 written) stays far above a dark one (mean 40).
    assert np.asarray(image).mean() > 150 > np.asarray(dataset[0][0]).mean()


def test_cifar_batch_reader_keeps_pixels(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path, per_batch=4)
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle)
    dataset = cifar_dataset(root, num_classes=10, train=True)
    # 5 training batches of 4; CIFAR rows are R-plane, G-plane, B-plane of 32x32 -> HWC.
    assert len(dataset) == 20
    assert dataset.data[0, 0, 1, 2] == raw["data"][0][2 * 1024 + 1]
    assert dataset.targets[:4] == [0, 1, 0, 1]
    assert len(cifar_dataset(root, num_classes=10, train=False)) == 4


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_matches_the_written_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compress: bool) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_fashion_idx(tmp_path / "fm", train=20, test=10, compress=compress)
    raw = (root / ("train-images-idx3-ubyte" + (".gz" if compress else ""))).read_bytes()
    raw = gzip.decompress(raw) if compress else raw
    expected = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(20, 28, 28)
    dataset = fashion_mnist_dataset(root, train=True)
    assert torch.equal(dataset.data, expected)
    assert dataset.targets.tolist() == [i % 10 for i in range(20)]
    # normalize=True stores (x/255 - 0.2860)/0.3530, Fashion-MNIST's statistics.
    normalized = fashion_mnist_dataset(root, train=False, normalize=True)
    image, label = normalized[3]
    raw_test = (root / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))).read_bytes()
    raw_test = gzip.decompress(raw_test) if compress else raw_test
    pixel = raw_test[16 + 3 * 784]
    assert label == 3 and image.shape == (1, 28, 28)
    assert image[0, 0, 0].item() == pytest.approx((pixel / 255 - 0.2860) / 0.3530, abs=1e-6)


def test_imagenet_eval_transform_is_one_centre_crop() -> None:
    transform = build_transform("imagenet", train=False, stats="imagenet", crop_size=224, resize_size=256)
    image = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    # Resize the short side to 256, then a 224x224 centre crop: the paper's single-crop evaluation.
    assert tuple(transform(image).shape) == (3, 224, 224)
    assert [type(t).__name__ for t in transform.transforms][1:3] == ["Resize", "CenterCrop"]


# ---------------------------------------------------------------- global batch over devices


def _with_world(data: ImageClassificationData, world: int) -> ImageClassificationData:
    data.trainer = SimpleNamespace(world_size=world)  # type: ignore[assignment]
    return data


def test_global_batch_is_divided_over_devices(tmp_path: Path) -> None:
    data = _with_world(ImageClassificationData("imagefolder", str(tmp_path), batch_size=256), 8)
    assert data.per_device_batch_size() == 32  # the paper's 256 over 8 GPUs
    data = _with_world(ImageClassificationData("imagefolder", str(tmp_path), batch_size=100), 3)
    with pytest.raises(ValueError, match=r"batch_size=100 is the global batch .* 3 devices"):
        data.per_device_batch_size()


# ---------------------------------------------------------------- bad inputs


def test_missing_data_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    data = ImageClassificationData("imagefolder", str(missing), num_workers=0)
    with pytest.raises(FileNotFoundError, match=re.escape(f"data path {str(missing)!r} does not exist")):
        data.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*dataset-fashion-mnist"):
        fashion_mnist_dataset(missing, train=True)
    with pytest.raises(FileNotFoundError, match="holds no CIFAR-10 batches"):
        cifar_dataset(tmp_path, num_classes=10, train=True)


def test_folder_without_images_is_named(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        CheckedImageFolder(tmp_path / "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        CheckedImageFolder(tmp_path / "empty")


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, per_class=2, splits=("train",))
    broken = root / "train" / "b" / "b1.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    dataset = CheckedImageFolder(root / "train")
    index = dataset.samples.index((str(broken), 1))
    with pytest.raises(CorruptImageError, match=re.escape(str(broken))):
        dataset[index]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n"


def test_an_eps_named_jpg_is_refused_without_running_ghostscript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow hands an EPS file to Ghostscript whatever its name; a data folder never runs code, so
    the folder's images open in raster formats only. A stand-in ``gs`` on PATH records any call."""
    fakebin, marker = tmp_path / "bin", tmp_path / "gs-ran"
    fakebin.mkdir()
    gs = fakebin / "gs"
    gs.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo 10.02.1; exit 0; fi\ntouch {marker}\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fakebin}{os.pathsep}{os.environ['PATH']}")
    root = write_image_folder(tmp_path / "data", per_class=2, splits=("train",))
    disguised = root / "train" / "a" / "a0.jpg"
    disguised.write_bytes(EPS)
    dataset = CheckedImageFolder(root / "train")
    index = [path for path, _ in dataset.samples].index(str(disguised))
    with pytest.raises(CorruptImageError, match=re.escape(str(disguised))):
        dataset[index]
    assert not marker.exists()


def test_batch_larger_than_the_data_is_refused(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, per_class=3)
    data = ImageClassificationData("imagefolder", str(root), batch_size=16, num_workers=0, crop_size=16)
    # 6 training images cannot fill one batch of 16 when incomplete batches are dropped.
    with pytest.raises(ValueError, match=r"batch_size=16 .* cannot be filled by the 6 training images"):
        data.setup("fit")
    relaxed = ImageClassificationData("imagefolder", str(root), batch_size=16, num_workers=0, drop_last=False)
    relaxed.setup("fit")
    assert len(relaxed.train_dataloader()) == 1


def test_subset_larger_than_the_split_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_fashion_idx(tmp_path / "fm", train=20, test=10)
    data = ImageClassificationData("fashion_mnist", str(root), batch_size=4, train_subset=50, num_workers=0)
    with pytest.raises(ValueError, match="train_subset=50 is larger than the 20 images"):
        data.setup("fit")


def test_a_corrupt_gz_leaves_no_temporary_file_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut-off or damaged .gz left tmpXXXX files in the cache folder on every try, and a gz holding garbage
    was reported with an empty reason ("...: ")."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    root = write_fashion_idx(tmp_path / "fm", train=20, test=10)
    images = root / "train-images-idx3-ubyte.gz"
    good = images.read_bytes()
    cases = {
        "Compressed file ended before the end-of-stream marker was reached": good[: len(good) // 2],
        "zlib.error: Error -3 while decompressing data": good[:20] + bytes(40) + good[60:],
        "BadGzipFile: Not a gzipped file": b"not a gzip file at all",
        "not an IDX file (its header's magic number or dimensions": gzip.compress(b"garbage" * 100),
    }
    for expected, content in cases.items():
        images.write_bytes(content)
        with pytest.raises(DataError) as caught:
            fashion_mnist_dataset(root, train=True)
        assert str(caught.value).startswith(f"corrupt Fashion-MNIST IDX file {str(images)!r}: ")
        assert expected in str(caught.value), str(caught.value)
        left = [p.name for p in cache.rglob("*") if p.is_file() and "idx" in p.parts]
        assert all(name == "train-images-idx3-ubyte" for name in left), left  # no temporary file
