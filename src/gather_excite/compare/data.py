"""The sweep's data: a split held as one uint8 tensor (on the training device) and batch augmentation.

Every batch is built by tensor operations on the whole batch (index, pad, crop by gathering, flip,
normalise): no per-sample Python work and no DataLoader. The random numbers come from a CPU
``torch.Generator`` owned by the run, so one seed gives the same order and the same crops and
flips on every variant and every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import fashion_mnist_dataset
from ..data.transforms import DATASET_STATS

__all__ = ["TensorSplit", "augment_batch", "load_fashion_mnist"]

MEAN, STD = DATASET_STATS["fashion_mnist"][0][0], DATASET_STATS["fashion_mnist"][1][0]
PADDING = 2  # the Fashion-MNIST recipe's random crop: pad 2, crop 28 (as gex train's transform)


@dataclass(frozen=True)
class TensorSplit:
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != self.images.shape[:1] or self.labels.device != self.images.device:
            raise ValueError("labels must hold one label per image, on the images' device")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> TensorSplit:
        """The split on ``device`` (one copy for the whole sweep)."""
        return TensorSplit(self.images.to(device), self.labels.to(device))

    def subset(self, size: int | None, *, seed: int = 0) -> TensorSplit:
        """``size`` images drawn without replacement by ``seed`` (all of them for ``None`` or ``size >= N``)."""
        if size is None or size >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size]
        order = order.sort().values.to(self.device)
        return TensorSplit(self.images[order], self.labels[order])

    def normalised(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Images ``index`` as normalised float32 ``(B, 1, H, W)`` (the evaluation input)."""
        return (self.images[index].unsqueeze(1).float().div_(255) - MEAN) / STD


def load_fashion_mnist(root: str, *, train: bool, download: bool = False) -> TensorSplit:
    """Fashion-MNIST's train or test split from its IDX files, as a CPU :class:`TensorSplit`."""
    dataset = fashion_mnist_dataset(root, train=train, download=download)
    return TensorSplit(dataset.data, dataset.targets)


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, padding: int = PADDING) -> torch.Tensor:
    """Random ``padding`` crop and horizontal flip of a uint8 batch ``(B, H, W)``, normalised to float ``(B, 1, H, W)``.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` (zero fill) + ``RandomHorizontalFlip``
    per image, done for the whole batch by one gather: row ``i`` of crop ``b`` is padded row
    ``dy[b] + i`` (likewise columns), reversed where ``flip[b]``. The offsets and flips are drawn on
    the CPU from ``generator`` (3 draws per batch), then moved to the images' device.
    """
    batch, height, width = images.shape
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    device = images.device
    dy, dx, flip = dy.to(device), dx.to(device), flip.to(device)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(height, device=device)  # (B, H)
    columns = torch.arange(width, device=device).expand(batch, width)
    columns = torch.where(flip[:, None], columns.flip(1), columns) + dx[:, None]  # (B, W)
    crops = padded[torch.arange(batch, device=device)[:, None, None], rows[:, :, None], columns[:, None, :]]
    return (crops.unsqueeze(1).float().div_(255) - MEAN) / STD
