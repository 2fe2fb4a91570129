"""Figures on matplotlib's Agg canvas (no pyplot, no display) and the PNG + JSON pair each analysis writes."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._atomic import atomic_write
from ..serialization import load_json_file

__all__ = ["load_report", "new_figure", "save_png", "write_report"]


def new_figure(
    panels: int, *, max_columns: int = 3, panel_size: tuple[float, float] = (4.0, 3.2)
) -> tuple[Figure, list[Axes]]:
    """A figure on an Agg canvas with ``panels`` axes laid out in rows of at most ``max_columns``."""
    if panels < 1:
        raise ValueError(f"panels must be >= 1, got {panels}")
    columns = min(panels, max_columns)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, columns, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def save_png(figure: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """``figure`` as a PNG at ``path``, written atomically (an earlier file stays until the new one is whole)."""
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return path


def write_report(
    report: dict[str, Any], plot: Callable[[dict[str, Any]], Figure], *, out_dir: str | Path, name: str
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.png`` (drawn from the JSON as written) to ``out_dir``.

    The figure is drawn and rendered first, then each file is written atomically (JSON, then PNG):
    an interruption leaves the earlier files whole, at worst the new JSON beside the earlier PNG
    (which ``gex analyze plot`` re-draws), never a truncated file.
    """
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    text = json.dumps(report, indent=1) + "\n"
    # Draw from what will be written, so the PNG is exactly what re-rendering the JSON gives.
    image = io.BytesIO()
    plot(json.loads(text)).savefig(image, format="png", dpi=120)
    with atomic_write(json_path) as handle:
        handle.write(text)
    with atomic_write(png_path, "wb") as handle:
        handle.write(image.getbuffer())
    return png_path, json_path


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report JSON written by :func:`write_report`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"report {str(path)!r} does not exist")
    report = load_json_file(path, f"report {str(path)!r}")
    if not isinstance(report, dict) or "analysis" not in report:
        raise ValueError(f"{str(path)!r} is not an analysis report (no 'analysis' key)")
    return report
