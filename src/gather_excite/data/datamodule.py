"""One LightningDataModule for the paper's datasets: ImageNet-style folders, CIFAR-10/100, Fashion-MNIST."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from ..errors import ConfigError, DataNotFoundError
from .cifar import cifar_dataset
from .fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, fashion_mnist_dataset
from .folder import CheckedImageFolder
from .transforms import build_normalized_augment, build_transform

__all__ = ["DATASETS", "DatasetName", "ImageClassificationData"]

DatasetName = Literal["imagefolder", "cifar10", "cifar100", "fashion_mnist"]

# name -> (num_classes or None if read from the folder, in_chans, crop size, transform recipe)
DATASETS: dict[str, tuple[int | None, int, int, str]] = {
    "imagefolder": (None, 3, 224, "imagenet"),
    "cifar10": (10, 3, 32, "cifar"),
    "cifar100": (100, 3, 32, "cifar"),
    "fashion_mnist": (10, 1, 28, "fashion_mnist"),
}


def _run_seed() -> int:
    """The run's seed: what ``seed_everything`` set (``gex train``'s ``seed_everything``), as Lightning reads it.
    Without one (``seed_everything: false``) it is 0, as for Lightning's ``DistributedSampler``: the
    training order is then the same in every run, not drawn anew."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class _EpochShuffle(RandomSampler):
    """A random order of the whole dataset that is a function of ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` before every training epoch, so a run resumed at epoch ``k``
    draws the batches of epoch ``k`` of an uninterrupted run (a plain ``RandomSampler`` draws from
    the global RNG, which ``seed_everything`` resets on every start). Under DDP Lightning replaces
    it by its ``DistributedSampler``, which shuffles with the same ``seed + epoch``.
    """

    def __init__(self, data_source: Any, *, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class ImageClassificationData(L.LightningDataModule):
    """Train/validation loaders of one dataset with the paper's transforms.

    Args:
        dataset: ``"imagefolder"`` (``ROOT/<train_split>/<class>/*.jpg`` and ``ROOT/<val_split>/...``,
            ImageNet recipe), ``"cifar10"``/``"cifar100"`` (torchvision's python batches in ROOT,
            Table 5 recipe) or ``"fashion_mnist"`` (IDX files in ROOT).
        root: the data folder.
        batch_size: the *global* training batch, divided evenly over all devices (256 in the paper).
        eval_batch_size: global validation batch (default: ``batch_size``).
        num_workers: loader processes per device; ``persistent_workers`` keeps them between epochs.
        pin_memory: page-locked batches for fast host-to-GPU copies (default: on when CUDA is there).
        persistent_workers: keep the loader processes alive between epochs instead of starting them
            anew each epoch (only with ``num_workers`` > 0).
        download: let torchvision fetch CIFAR / Fashion-MNIST into ROOT when missing.
        augment: random crops and flips for training (``False``: the evaluation transform).
        crop_size: side in pixels of the random training crops (and, for ``imagefolder``, of the
            evaluation centre crop); default: the dataset's, 224 ``imagefolder``, 32 CIFAR, 28 Fashion-MNIST.
        resize_size: ``imagefolder`` only: the evaluation images' shorter side is resized to this many
            pixels before the centre crop (default: ``crop_size * 256 / 224``, 256 for a 224 crop).
        train_split: ``imagefolder`` only: the sub-folder of ROOT holding the training images.
        val_split: ``imagefolder`` only: the sub-folder of ROOT holding the validation images.
        train_subset: train on a fixed random subset of this many training images (default: all).
        val_subset: validate on a fixed random subset of this many validation images (default: all).
        subset_seed: the seed that draws ``train_subset`` and ``val_subset`` (independent of the
            run's seed, so runs of several seeds see the same images).
        drop_last: drop the last incomplete training batch (every step sees the full batch).

    The training order is a function of the run's seed and the epoch (a resumed run draws the
    batches of an uninterrupted one); under DDP each process evaluates its own share of the
    validation set, every image exactly once, and draws its own augmentations (seed + rank).
    """

    def __init__(
        self,
        dataset: DatasetName = "fashion_mnist",
        root: str = DEFAULT_FASHION_MNIST_ROOT,
        *,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        download: bool = False,
        augment: bool = True,
        crop_size: int | None = None,
        resize_size: int | None = None,
        train_split: str = "train",
        val_split: str = "val",
        train_subset: int | None = None,
        val_subset: int | None = None,
        subset_seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (
            ("train_subset", train_subset),
            ("val_subset", val_subset),
            ("crop_size", crop_size),
            ("resize_size", resize_size),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an int >= 1 or None, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = str(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.download = download
        self.augment = augment
        known_classes, self.in_chans, default_crop, self.recipe = DATASETS[dataset]
        self._num_classes = known_classes
        self.crop_size = crop_size or default_crop
        self.resize_size = resize_size
        self.train_split, self.val_split = train_split, val_split
        self.train_subset, self.val_subset, self.subset_seed = train_subset, val_subset, subset_seed
        self.drop_last = drop_last
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (for image folders: the class sub-folders of the training split)."""
        if self._num_classes is None:
            self._num_classes = len(self._build(train=True, transform=None).classes)
        return self._num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of a transformed image."""
        return (self.in_chans, self.crop_size, self.crop_size)

    def _stats(self) -> str:
        return "imagenet" if self.dataset == "imagefolder" else self.dataset

    def _build(self, *, train: bool, transform: Any) -> Any:
        if self.dataset == "imagefolder":
            root = Path(self.root).expanduser()
            if not root.is_dir():
                raise DataNotFoundError(
                    f"data path {self.root!r} does not exist; expected ROOT/{self.train_split}/<class>/<image>.jpg "
                    f"and ROOT/{self.val_split}/<class>/<image>.jpg"
                )
            return CheckedImageFolder(root / (self.train_split if train else self.val_split), transform=transform)
        if self.dataset in ("cifar10", "cifar100"):
            return cifar_dataset(
                self.root,
                num_classes=DATASETS[self.dataset][0],
                train=train,
                transform=transform,
                download=self.download,
            )
        return fashion_mnist_dataset(self.root, train=train, transform=transform, download=self.download)

    def _dataset(self, *, train: bool) -> Dataset[Any]:
        if self.dataset == "fashion_mnist":
            # In-memory tensors: normalise the split once; only the random crop/flip runs per item.
            augment = build_normalized_augment(stats="fashion_mnist", crop_size=self.crop_size, padding=2)
            transform = augment if train and self.augment else None
            dataset = fashion_mnist_dataset(
                self.root, train=train, transform=transform, normalize=True, download=self.download
            )
            return self._subset(dataset, train=train)
        transform = build_transform(
            self.recipe,  # type: ignore[arg-type]
            train=train,
            stats=self._stats(),
            crop_size=self.crop_size,
            resize_size=self.resize_size,
            augment=self.augment,
        )
        dataset = self._build(train=train, transform=transform)
        if self._num_classes is None:
            self._num_classes = len(dataset.classes)
        return self._subset(dataset, train=train)

    def _subset(self, dataset: Any, *, train: bool) -> Dataset[Any]:
        size = self.train_subset if train else self.val_subset
        if size is not None:
            name = "train_subset" if train else "val_subset"
            if size > len(dataset):
                raise ConfigError(f"{name}={size} is larger than the {len(dataset)} images of {self._describe(train)}")
            generator = torch.Generator().manual_seed(self.subset_seed + (0 if train else 1))
            dataset = Subset(dataset, torch.randperm(len(dataset), generator=generator)[:size].tolist())
        return dataset

    def _describe(self, train: bool) -> str:
        split = "training" if train else "validation"
        return f"the {split} split of {self.dataset} in {self.root!r}"

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def per_device_batch_size(self, *, train: bool = True, world_size: int | None = None) -> int:
        """The global batch divided by the number of devices (which must divide it).

        ``world_size``: the number of devices, by default the attached trainer's (``gex train``
        checks the batch sizes with it before the processes start).
        """
        world = self._world_size() if world_size is None else world_size
        total = self.batch_size if train else self.eval_batch_size
        if total % world:
            name = "batch_size" if train else "eval_batch_size"
            raise ConfigError(
                f"{name}={total} is the global batch and must divide evenly over the {world} devices "
                f"(nodes x devices); use a multiple of {world}"
            )
        return total // world

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs and check the batch size against the training set."""
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(train=True)
            size = len(self.train_set)
            per_device = self.per_device_batch_size(train=True)
            world = self._world_size()
            # Each device draws ceil(size / world) samples per epoch from the distributed sampler.
            per_device_samples = -(-size // world)
            if self.drop_last and per_device_samples < per_device:
                raise ConfigError(
                    f"batch_size={self.batch_size} (global, {per_device} per device on {world} device(s)) cannot be "
                    f"filled by the {size} training images of {self._describe(True)} with drop_last=True, so an "
                    f"epoch would have no step; use batch_size <= {size - size % world or size} or drop_last=False"
                )
        if stage in (None, "fit", "validate", "test") and self.val_set is None:
            self.val_set = self._dataset(train=False)
            self.per_device_batch_size(train=False)
            world = self._world_size()
            if len(self.val_set) < world:  # every process must evaluate at least one image (see _eval_sampler)
                raise ConfigError(
                    f"the {len(self.val_set)} images of {self._describe(False)} cannot be shared by {world} devices; "
                    f"evaluate with at least {world} images (val_subset) or fewer devices"
                )
        if stage in (None, "fit"):
            self._seed_per_process()

    def _seed_per_process(self) -> None:
        """Under DDP, seed this process's own RNGs (torch, random) with the run's seed + its global rank.

        Every process starts from the same ``seed_everything``; without this, the augmentations drawn
        in the main process (``num_workers=0``) would be the same random numbers on every rank. (Loader
        workers take their seeds from this RNG, or per rank from Lightning with ``workers=True``.)
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._world_size() <= 1:
            return
        seed = _run_seed() + int(getattr(trainer, "global_rank", 0))
        torch.manual_seed(seed)
        random.seed(seed)

    def _eval_sampler(self, dataset: Dataset[Any]) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each process's share of the evaluation set, every image exactly once.

        Lightning's ``DistributedSampler`` pads the shares to equal length with repeated images,
        which validation and test would count twice; this one leaves the last shares one image
        shorter (torchmetrics and the logged loss sum over the processes, so the figures are those
        of the whole set). ``None`` on a single device: Lightning leaves the loader as it is.
        """
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        if not kwargs or int(kwargs.get("num_replicas", 1)) <= 1:
            return None
        return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)

    def _loader(self, dataset: Dataset[Any] | None, *, train: bool) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = self.num_workers
        sampler = _EpochShuffle(dataset, seed=_run_seed()) if train else self._eval_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size(train=train),
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            drop_last=self.drop_last and train,
            prefetch_factor=4 if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_set, train=False)
