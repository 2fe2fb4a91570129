"""torchvision's dataset downloads, failing as one line: no network, a moved URL, a bad checksum."""

from __future__ import annotations

import contextlib
import urllib.error
from collections.abc import Iterator

from ..errors import DataError, one_line

__all__ = ["download_errors"]


@contextlib.contextmanager
def download_errors(root: object, dataset: str) -> Iterator[None]:
    """Report a failed torchvision download into ``root`` as a :class:`~gather_excite.errors.DataError`."""
    try:
        yield
    except (RuntimeError, OSError, urllib.error.URLError) as err:  # torchvision wraps URL errors in RuntimeError
        raise DataError(
            f"data path {str(root)!r}: downloading {dataset} failed ({one_line(err)[:300]}); without network, "
            "put its files there yourself"
        ) from None
