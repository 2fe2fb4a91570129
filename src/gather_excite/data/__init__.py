"""Datasets and transforms: ImageNet-style folders, CIFAR-10/100, Fashion-MNIST IDX files, one LightningDataModule."""

from .cifar import CIFAR10Files, CIFAR100Files, cifar_dataset, read_cifar_pickle
from .datamodule import DATASETS, DatasetName, ImageClassificationData
from .fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES, IDXImageDataset, fashion_mnist_dataset
from .folder import CheckedImageFolder, CorruptImageError
from .transforms import DATASET_STATS, build_transform

__all__ = [
    "DATASETS",
    "DATASET_STATS",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "CIFAR10Files",
    "CIFAR100Files",
    "CheckedImageFolder",
    "CorruptImageError",
    "DatasetName",
    "IDXImageDataset",
    "ImageClassificationData",
    "build_transform",
    "cifar_dataset",
    "fashion_mnist_dataset",
    "read_cifar_pickle",
]
