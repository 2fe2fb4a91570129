"""How to feed a model: input size, normalisation and the evaluation transform that travel with its weights.

Like torchvision's ``Weights.transforms()`` and timm's ``pretrained_cfg``/``resolve_data_config``::

    model = gather_excite.create_model("ge_theta_cifar_resnet20", pretrained="runs/export")
    config = gather_excite.resolve_data_config(model)   # DataConfig(input_size=(1, 28, 28), mean=..., ...)
    batch = config.eval_transform()(pil_image).unsqueeze(0)

A model built with weights carries their configuration (``model.pretrained_cfg``); a model
without weights gets the configuration of the recipe its backbone is made for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["DataConfig", "data_config_from_datamodule", "recipe_config", "resolve_data_config"]

# Backbones built for 224-pixel ImageNet crops; the others are the 32/28-pixel CIFAR-style networks.
_IMAGENET_BACKBONES = ("ResNet", "ShuffleNet")


@dataclass(frozen=True)
class DataConfig:
    """The input a model expects and the single-crop evaluation transform that produces it.

    Args:
        input_size: ``(channels, height, width)`` of a network input.
        mean, std: per-channel normalisation of pixel values in [0, 1].
        resize_size: the shorter side is resized to this before the centre crop to
            ``input_size`` (ImageNet: 256 for 224); ``None``: to the crop's shorter side (a no-op on
            images of the input size, as CIFAR's and Fashion-MNIST's are).
        interpolation: of that resize (torchvision's ``InterpolationMode`` value).
        dataset: what the weights were trained on, where known.
        label_names: class names in output order, where known.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int | None = None
    interpolation: str = "bilinear"
    dataset: str | None = None
    label_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        channels = self.input_size[0]
        if len(self.input_size) != 3 or len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"input_size must be (C, H, W) with C mean and std values, got input_size={self.input_size}, "
                f"mean={self.mean}, std={self.std}"
            )

    def eval_transform(self) -> Any:
        """A torchvision ``transforms.v2`` pipeline: PIL image or uint8 tensor -> normalised float ``(C, H, W)``."""
        import torch
        from torchvision.transforms import InterpolationMode, v2

        # Without a resize_size the shorter side goes to the crop's (timm's crop_pct 1.0): a no-op on
        # images of the input size, and an image of another size still becomes one the network expects.
        resize = self.resize_size if self.resize_size is not None else min(self.input_size[1:])
        steps: list[Any] = [
            v2.ToImage(),
            v2.Resize(resize, interpolation=InterpolationMode(self.interpolation), antialias=True),
            v2.CenterCrop(list(self.input_size[1:])),
        ]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        return v2.Compose(steps)

    @property
    def crop_pct(self) -> float:
        """timm's name for the crop: ``crop / resize``, so that timm's ``floor(crop / crop_pct)`` gives back
        ``resize_size`` (1.0 without a resize: timm's resize to the crop is then a no-op on such images)."""
        crop = min(self.input_size[1:])
        if self.resize_size is None:
            return 1.0
        pct = crop / self.resize_size
        while math.floor(crop / pct) < self.resize_size:  # a float quotient just below the integer
            pct = math.nextafter(pct, 0.0)
        return pct

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``pretrained_cfg`` of ``config.json``), with timm's ``crop_pct``/``crop_mode``
        so that ``timm.data.resolve_data_config`` builds the same evaluation transform."""
        values = asdict(self)
        values = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
        return {**values, **self.timm_keys()}

    def timm_keys(self) -> dict[str, Any]:
        """The crop as timm's ``pretrained_cfg`` states it (our ``resize_size`` is not a timm key)."""
        return {"crop_pct": self.crop_pct, "crop_mode": "center"}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, label_names: Any = None) -> DataConfig:
        """The inverse of :meth:`to_dict` (unknown keys, such as a ``source`` note, are ignored)."""
        names = values.get("label_names") or label_names
        resize = values.get("resize_size")
        return cls(
            input_size=tuple(int(v) for v in values["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            resize_size=None if resize is None else int(resize),
            interpolation=str(values.get("interpolation", "bilinear")),
            dataset=values.get("dataset"),
            label_names=None if names is None else tuple(str(n) for n in names),
        )


def _label_names(dataset: str, root: str | None, train_split: str) -> tuple[str, ...] | None:
    """Class names of a dataset where they can be known without reading the images."""
    from .data import FASHION_MNIST_CLASSES

    if dataset == "fashion_mnist":
        return tuple(FASHION_MNIST_CLASSES)
    if root is None:
        return None
    try:
        if dataset in ("cifar10", "cifar100"):
            from .data import cifar_dataset

            return tuple(cifar_dataset(root, num_classes=int(dataset[5:]), train=False).classes)
        folder = Path(root).expanduser() / train_split
        if dataset == "imagefolder" and folder.is_dir():
            return tuple(sorted(entry.name for entry in folder.iterdir() if entry.is_dir()))
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def data_config_from_datamodule(arguments: dict[str, Any]) -> DataConfig:
    """The :class:`DataConfig` of :class:`~gather_excite.data.ImageClassificationData` saved arguments."""
    from .data import DATASET_STATS, DATASETS

    dataset = str(arguments.get("dataset", "fashion_mnist"))
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    _, in_chans, default_crop, recipe = DATASETS[dataset]
    crop = int(arguments.get("crop_size") or default_crop)
    stats = "imagenet" if dataset == "imagefolder" else dataset
    mean, std = DATASET_STATS[stats]
    resize = None
    if recipe == "imagenet":
        # As build_transform: the recipe's resize, or the 256/224 ratio of the crop.
        resize = int(arguments.get("resize_size") or round(crop * 256 / 224))
    return DataConfig(
        input_size=(in_chans, crop, crop),
        mean=mean,
        std=std,
        resize_size=resize,
        dataset=dataset,  # an image folder is not ImageNet, though it is normalised with ImageNet's mean/std
        label_names=_label_names(dataset, arguments.get("root"), str(arguments.get("train_split", "train"))),
    )


def recipe_config(model: nn.Module) -> DataConfig:
    """The :class:`DataConfig` of the recipe ``model``'s backbone is made for, whatever weights it holds."""
    from .data import DATASET_STATS

    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise TypeError(
            f"model {type(model).__name__} has no pretrained_cfg and no Conv2d to read its input from: "
            "resolve_data_config takes a network (gather_excite.create_model), not a layer"
        )
    channels = first_conv.in_channels
    height, width = getattr(model, "input_size", (224, 224))
    if type(model).__name__ in _IMAGENET_BACKBONES:
        stats, resize = "imagenet", round(min(height, width) * 256 / 224)
    else:
        stats, resize = ("fashion_mnist" if channels == 1 else "cifar10"), None
    mean, std = DATASET_STATS[stats]
    if len(mean) != channels:
        mean, std = (0.5,) * channels, (0.5,) * channels
    return DataConfig(input_size=(channels, height, width), mean=mean, std=std, resize_size=resize)


def resolve_data_config(model: nn.Module) -> DataConfig:
    """The :class:`DataConfig` that travels with ``model``'s weights (``model.pretrained_cfg``).

    A model without weights gets its recipe's: ImageNet mean/std with a resize to 256/224 of
    the input size for the ImageNet backbones, CIFAR-10 (3 channels) or Fashion-MNIST (1
    channel) statistics at the input size for the CIFAR-style ones.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        return DataConfig.from_dict(cfg, label_names=getattr(model, "label_names", None))
    return recipe_config(model)
