"""Error curves from training runs (Section 4 Figure 4, and Figure 2's error against extent ratio).

A run is the ``--out`` folder of ``gex train``: its Lightning CSV log ``csv/metrics.csv``
(``train/top1_err`` and ``val/top1_err`` logged once an epoch, in %), and, when the run was
evaluated, ``eval.json`` (``model``, ``top1_err``). ``gex compare``'s ``results.json`` (``variants``:
per variant its ``model``, ``test_top1_err`` per seed and per-epoch ``curves`` per seed) feeds both plots.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..layers import ContextSpec
from ..models import split_model_name
from ..serialization import load_json_file, load_torch_file
from .plotting import new_figure

__all__ = [
    "epoch_curves_report",
    "extent_report",
    "model_extent",
    "plot_curves",
    "read_metrics",
    "read_run",
]

METRIC_COLUMNS = {"train": "train/top1_err", "val": "val/top1_err"}


def _metrics_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"run {str(path)!r} does not exist (expected a gex train --out folder or a metrics.csv)")
    direct = path / "csv" / "metrics.csv"
    if direct.is_file():
        return direct
    if direct.exists():
        raise ValueError(f"{str(direct)!r} is a folder; expected the Lightning CSV log file of gex train there")
    found = sorted((p for p in path.rglob("metrics.csv") if p.is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"run {str(path)!r} holds no metrics.csv (Lightning CSV log of gex train)")
    return found[-1]


def read_metrics(path: str | Path) -> dict[str, list[float | None]]:
    """Per-epoch top-1 train and validation error (%) from a Lightning ``metrics.csv`` (or its run folder).

    Lightning writes one row per logging call; an epoch's value is the last one logged in that
    epoch. ``epoch`` is 1-based (epochs completed); a missing value is ``None``.
    """
    file = _metrics_file(Path(path))
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{str(file)!r} is not a Lightning metrics.csv (not CSV text: {err})") from None
    if not rows or "epoch" not in rows[0]:
        raise ValueError(f"{str(file)!r} is not a Lightning metrics.csv (no 'epoch' column)")
    missing = [column for column in METRIC_COLUMNS.values() if column not in rows[0]]
    if len(missing) == len(METRIC_COLUMNS):
        raise ValueError(f"{str(file)!r} logs none of {list(METRIC_COLUMNS.values())}")
    per_epoch: dict[int, dict[str, float]] = {}
    for row in rows:
        if not row.get("epoch"):
            continue
        epoch = int(float(row["epoch"]))
        for column in METRIC_COLUMNS.values():
            if row.get(column):
                per_epoch.setdefault(epoch, {})[column] = float(row[column])
    epochs = sorted(per_epoch)
    result: dict[str, list[float | None]] = {"epoch": [e + 1 for e in epochs]}
    for split, column in METRIC_COLUMNS.items():
        result[f"{split}_top1_err"] = [per_epoch[e].get(column) for e in epochs]
    return result


def _checkpoint_model(run: Path) -> str | None:
    for path in (run / "checkpoints" / "last.ckpt", *sorted(run.glob("checkpoints/*.ckpt"))):
        if path.is_file():
            saved = load_torch_file(path, f"checkpoint {str(path)!r}", mmap=True)
            arch = (saved.get("hyper_parameters") or {}).get("arch") if isinstance(saved, dict) else None
            if isinstance(arch, str):
                return arch
    return None


def read_run(path: str | Path, *, label: str | None = None) -> dict[str, Any]:
    """A run's name, model, final top-1 error and per-epoch curves (a metrics.csv alone gives curves only)."""
    path = Path(path)
    run = path if path.is_dir() else path.parent
    info: dict[str, Any] = {"path": str(path), "label": label or (run.parent.name if run.name == "csv" else run.name)}
    evaluation = run / "eval.json"
    if evaluation.is_file():
        result = load_json_file(evaluation, f"{str(evaluation)!r}")
        if not isinstance(result, dict):
            raise ValueError(
                f"{str(evaluation)!r} holds a JSON {type(result).__name__}; expected an object (gex eval's output)"
            )
        info["model"], info["top1_err"] = result.get("model"), result.get("top1_err")
    if info.get("model") is None and path.is_dir():
        info["model"] = _checkpoint_model(run)
    try:
        info.update(read_metrics(path))
    except ValueError:
        if info.get("top1_err") is None:  # nothing to draw (a detection run's eval.json has AP, no top-1 error)
            raise
    if info.get("top1_err") is None:
        finals = [v for v in info.get("val_top1_err", []) if v is not None]
        info["top1_err"] = finals[-1] if finals else None
    return info


def _is_results_json(path: Path) -> bool:
    return path.is_file() and path.suffix == ".json"


def _compare_variants(path: Path) -> list[dict[str, Any]]:
    data = load_json_file(path, f"{str(path)!r}")
    entries = data.get("variants") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "model" in e for e in entries):
        raise ValueError(f"{str(path)!r} is not a gex compare results.json (a list of 'variants' with 'model')")
    return entries


def _numbers(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _mean_or_none(values: list[Any]) -> float | None:
    numbers = _numbers(values)
    return sum(numbers) / len(numbers) if numbers else None


def _band_or_none(values: list[Any]) -> list[float] | None:
    """``[mean - SE, mean + SE]`` over the seeds (SE: sample standard deviation over sqrt(n))."""
    numbers = _numbers(values)
    if len(numbers) < 2:
        return None
    mean, se = statistics.fmean(numbers), statistics.stdev(numbers) / math.sqrt(len(numbers))
    return [mean - se, mean + se]


# The held-out error per epoch: gex compare logs it as "curve_top1_err" (its test subset).
_HELD_OUT_KEYS = ("curve_top1_err", "test_top1_err", "val_top1_err")


def _held_out(row: Mapping[str, Any]) -> Any:
    return next((row[key] for key in _HELD_OUT_KEYS if key in row), None)


def _compare_curves(path: Path) -> list[dict[str, Any]]:
    """Per variant of a gex compare results.json: train/test error per epoch, the mean over seeds.

    With several seeds, ``*_band`` holds each epoch's mean ± its standard error (drawn shaded).
    """
    rows = []
    for entry in _compare_variants(path):
        histories = entry.get("curves") or []
        if not histories:
            raise ValueError(f"{str(path)!r}: variant {entry['model']!r} holds no per-epoch 'curves'")
        epochs = sorted({row["epoch"] for history in histories for row in history})
        by_epoch = [[row for history in histories for row in history if row["epoch"] == e] for e in epochs]
        train = [[r.get("train_top1_err") for r in rs] for rs in by_epoch]
        held_out = [[_held_out(r) for r in rs] for rs in by_epoch]
        row: dict[str, Any] = {
            "path": str(path),
            "label": entry.get("label", entry["model"]),
            "model": entry["model"],
            "epoch": epochs,
            "train_top1_err": [_mean_or_none(values) for values in train],
            "val_top1_err": [_mean_or_none(values) for values in held_out],
            "seeds": len(histories),
        }
        if len(histories) > 1:
            row["train_top1_err_band"] = [_band_or_none(values) for values in train]
            row["val_top1_err_band"] = [_band_or_none(values) for values in held_out]
        rows.append(row)
    return rows


def epoch_curves_report(
    runs: Sequence[str | Path], *, labels: Sequence[str] | None = None, title: str | None = None
) -> dict[str, Any]:
    """Figure 4 data: per run, top-1 train and validation error per epoch.

    ``runs`` are run folders or ``metrics.csv`` files (one curve each) or ``gex compare``
    ``results.json`` files (one curve per variant, the mean over its seeds ± its standard error shaded).
    ``title`` heads the figure.
    """
    if not runs:
        raise ValueError("runs must name at least one run folder or metrics.csv")
    rows = []
    for run in runs:
        path = Path(run)
        if _is_results_json(path):
            rows += _compare_curves(path)
            continue
        info = read_run(path)
        if "epoch" not in info:
            raise ValueError(f"run {str(run)!r} has no per-epoch top-1 errors (metrics.csv) to draw curves from")
        rows.append(info)
    if labels is not None:
        if len(labels) != len(rows):
            raise ValueError(f"labels must give one label per curve ({len(rows)}), got {len(labels)}")
        for row, label in zip(rows, labels, strict=True):
            row["label"] = label
    report: dict[str, Any] = {"analysis": "curves", "kind": "epochs", "runs": rows}
    if title is not None:
        report["title"] = title
    return report


def model_extent(model: str) -> tuple[str | None, int | str | None]:
    """``(context variant, extent)`` of a registered model name: ge_theta_e4_resnet50 -> ("ge_theta", 4).

    Global-extent variants give ``"global"``; the baseline gives ``(None, None)``.
    """
    _, spec = split_model_name(model)
    if spec is None:
        return None, None
    parsed = ContextSpec.parse(spec)
    return parsed.variant, "global" if parsed.extent is None else parsed.extent


def _compare_errors(path: Path) -> list[dict[str, Any]]:
    rows = []
    for entry in _compare_variants(path):
        errors = entry.get("top1_err", entry.get("test_top1_err"))
        errors = _numbers(errors if isinstance(errors, list) else [errors])
        rows.append(
            {
                "path": str(path),
                "label": entry.get("label", entry["model"]),
                "model": entry["model"],
                "top1_err": sum(errors) / len(errors) if errors else None,
                "top1_errs": errors,  # one per seed
            }
        )
    return rows


def extent_report(runs: Sequence[str | Path]) -> dict[str, Any]:
    """Figure 2 data: final top-1 error against extent ratio, a line per context variant and backbone.

    ``runs`` are ``gex train`` run folders (model from ``eval.json`` or the checkpoint) or
    ``gex compare`` ``results.json`` files. Runs of one model (seeds; a model name fixes the
    variant, backbone and extent) are one point, the mean over all their seeds: two points at
    one extent would be two x positions with one label. Runs without an extent ratio (the
    baseline, SE) become horizontal reference lines, drawn with the variants of their backbone.
    """
    if not runs:
        raise ValueError("runs must name at least one run folder or results.json")
    entries: list[dict[str, Any]] = []
    for run in runs:
        path = Path(run)
        entries += _compare_errors(path) if _is_results_json(path) else [read_run(path)]
    by_model: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not entry.get("model"):
            raise ValueError(f"run {entry['path']!r}: cannot tell its model (no eval.json or checkpoint)")
        if entry.get("top1_err") is None:
            raise ValueError(f"run {entry['path']!r}: no top-1 error (no eval.json and no val/top1_err logged)")
        seen = by_model.setdefault(entry["model"], {"labels": [], "errors": [], "runs": []})
        seen["labels"].append(entry["label"])
        seen["errors"] += entry.get("top1_errs", [entry["top1_err"]])
        seen["runs"].append(entry["path"])
    variants: dict[tuple[str, str], dict[str, Any]] = {}
    references = []
    for model, seen in by_model.items():
        backbone, _ = split_model_name(model)
        variant, extent = model_extent(model)
        errors = seen["errors"]
        mean = sum(errors) / len(errors)
        point = {"extent": extent, "top1_err": mean, "seeds": len(errors), "model": model, "runs": seen["runs"]}
        if variant is None or variant == "se":
            label = seen["labels"][0] if len(set(seen["labels"])) == 1 else model
            references.append({"label": label, "backbone": backbone, **point})
            continue
        group = variants.setdefault(
            (variant, backbone),
            {"variant": variant, "backbone": backbone, "label": ContextSpec(variant).label, "points": []},
        )
        group["points"].append(point)
    if len({backbone for _, backbone in variants}) > 1:
        for group in variants.values():
            group["label"] += f", {group['backbone']}"
    for group in variants.values():
        group["points"].sort(key=lambda p: math.inf if p["extent"] == "global" else p["extent"])
    return {"analysis": "curves", "kind": "extent", "variants": list(variants.values()), "references": references}


def _plot_epochs(report: Mapping[str, Any]) -> Figure:
    fig, (train_ax, val_ax) = new_figure(2, panel_size=(5.0, 3.6))
    colors = [f"C{i}" for i in range(10)]
    for index, run in enumerate(report["runs"]):
        color = colors[index % len(colors)]
        for ax, key in ((train_ax, "train_top1_err"), (val_ax, "val_top1_err")):
            points = [(e, v) for e, v in zip(run["epoch"], run[key], strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "-o", markersize=3, color=color, label=run["label"])
            spans = [(e, *span) for e, span in zip(run["epoch"], run.get(f"{key}_band", ()), strict=False) if span]
            if spans:
                ax.fill_between(*zip(*spans, strict=True), color=color, alpha=0.15)
    for ax, split in ((train_ax, "training"), (val_ax, "validation")):
        ax.set_title(f"top-1 {split} error")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if report.get("title"):
        fig.suptitle(report["title"])
    return fig


def _plot_extent(report: Mapping[str, Any]) -> Figure:
    variants = report["variants"]
    if not variants:
        raise ValueError("the report holds no context variant with an extent ratio to plot")
    fig, axes = new_figure(len(variants), panel_size=(4.5, 3.4))
    for ax, group in zip(axes, variants, strict=True):
        ticks = [str(p["extent"]) if p["extent"] == "global" else f"E{p['extent']}" for p in group["points"]]
        ax.plot(range(len(ticks)), [p["top1_err"] for p in group["points"]], "-o", label=group["label"])
        # A panel is one backbone (a report written before backbones were told apart has no "backbone").
        same_backbone = [r for r in report["references"] if r.get("backbone") in (None, group.get("backbone"))]
        for index, reference in enumerate(same_backbone):
            ax.axhline(
                reference["top1_err"],
                color=f"C{index + 1}",
                linestyle="--",
                label=f"{reference['label']} ({reference['top1_err']:.2f})",
            )
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_title(group["label"])
        ax.set_xlabel("extent ratio")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_curves(report: Mapping[str, Any]) -> Figure:
    """Figure 4 (``kind="epochs"``: train and validation panels) or Figure 2 (``kind="extent"``)."""
    kind = report.get("kind")
    if kind == "epochs":
        return _plot_epochs(report)
    if kind == "extent":
        return _plot_extent(report)
    raise ValueError(f"report kind must be 'epochs' or 'extent', got {kind!r}")
