"""ImageNet-style folders (``ROOT/<split>/<class>/<image>``) through torchvision's ImageFolder, with clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError, DataNotFoundError
from .images import IMAGE_FORMATS, open_image

__all__ = ["CheckedImageFolder", "CorruptImageError"]


class CorruptImageError(DataError):
    """An image file that PIL cannot decode; the message names the file."""


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            image = open_image(handle)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(
            f"corrupt or unreadable image file {path!r}: {err} (images open as {', '.join(IMAGE_FORMATS)})"
        ) from err


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder whose errors name the folder or file at fault.

    A missing folder, a folder without class sub-folders or without images, and a file that
    does not decode each raise with the path and the expected layout.
    """

    def __init__(self, root: str | Path, *, transform: Callable[..., Any] | None = None) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(
                f"data path {str(root)!r} does not exist or is not a folder; expected the layout "
                f"{root}/<class>/<image>.jpg (ImageNet: ROOT/train/n01440764/*.JPEG, ROOT/val/...)"
            )
        try:
            super().__init__(str(root), transform=transform, loader=_load_rgb)
        except FileNotFoundError as err:
            extensions = ", ".join(IMG_EXTENSIONS)
            raise DataNotFoundError(
                f"data path {str(root)!r} holds no images: expected class sub-folders with image files "
                f"({extensions}) as {root}/<class>/<image>.jpg ({err})"
            ) from None
