"""Opening image files from a data folder a user was handed: raster formats only.

``Image.open`` otherwise tries every format Pillow knows, EPS among them, which it runs through
Ghostscript where that is installed: a data folder never runs code. The formats are those of
torchvision's ``IMG_EXTENSIONS`` (JPEG, PNG, PPM/PGM, BMP, TIFF, WebP); Pillow raises ``KeyError``
for a format it was built without, so those are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from PIL import Image

__all__ = ["IMAGE_FORMATS", "open_image"]

Image.init()
IMAGE_FORMATS = tuple(f for f in ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP") if f in Image.OPEN)


def open_image(file: str | Path | IO[bytes]) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS` (lazy: reads the header only)."""
    return Image.open(file, formats=IMAGE_FORMATS)
