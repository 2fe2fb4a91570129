"""The sweep's aggregate: ``results.json`` (every run plus per-variant statistics), its schema, table and plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .stats import mean_se, paired_difference, resolved

__all__ = [
    "RESULTS_FORMAT",
    "RESULTS_SCHEMA",
    "build_results",
    "curves_title",
    "format_table",
    "json_safe",
    "validate_results",
]

RESULTS_FORMAT = "gex-compare-results/2"

_NUMBER = {"type": "number"}
_MAYBE_NUMBER = {"type": ["number", "null"]}  # null: unknown (the SE of one seed) or not finite (a diverged run)
_CURVE_ROW = {
    "type": "object",
    "required": ["epoch", "lr", "train_loss", "train_top1_err", "curve_top1_err"],
    "properties": {
        "epoch": {"type": "integer", "minimum": 1},
        "lr": _NUMBER,  # the rate the epoch trained with
        "train_loss": _MAYBE_NUMBER,
        "train_top1_err": {"type": "number", "minimum": 0, "maximum": 100},
        "curve_top1_err": {"type": "number", "minimum": 0, "maximum": 100},
        "curve_loss": _MAYBE_NUMBER,
    },
}
RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "label",
        "model",
        "seed",
        "spec",
        "test_top1_err",
        "test_top5_err",
        "test_loss",
        "test_images",
        "train_images",
        "curve_images",
        "curve",
        "steps",
        "train_images_per_s",
        "train_images_per_cpu_s",
        "wall_seconds",
        "cpu_seconds",
        "threads",
        "device",
        "compiled",
    ],
    "properties": {
        "label": {"type": "string"},
        "model": {"type": "string"},
        "seed": {"type": "integer", "minimum": 0},
        "spec": {"type": "object", "required": ["model", "seed", "epochs", "batch_size", "lr"]},
        "test_top1_err": {"type": "number", "minimum": 0, "maximum": 100},
        "test_top5_err": {"type": "number", "minimum": 0, "maximum": 100},
        "test_loss": _MAYBE_NUMBER,
        "test_images": {"type": "integer", "minimum": 1},
        "train_images": {"type": "integer", "minimum": 1},
        "curve": {"type": "array", "minItems": 1, "items": _CURVE_ROW},
        "train_images_per_s": {"type": "number", "exclusiveMinimum": 0},
        "compiled": {"type": "boolean"},
        "compile_error": {"type": ["string", "null"]},
        "diverged": {"type": "boolean"},  # a loss went non-finite (records before it have no such key)
    },
}
# A variant row: every property is required.
_VARIANT_PROPERTIES: dict[str, Any] = {
    "label": {"type": "string"},
    "model": {"type": "string"},
    "params": {"type": "integer", "minimum": 1},
    "macs": {"type": "integer", "minimum": 1},
    "seeds": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    "test_top1_err": {"type": "array", "items": _NUMBER},
    "test_top5_err": {"type": "array", "items": _NUMBER},
    "test_top1_err_mean": _NUMBER,
    "test_top1_err_se": _MAYBE_NUMBER,
    "diff_to_baseline": {"type": ["array", "null"], "items": _NUMBER},
    "diff_to_baseline_mean": _MAYBE_NUMBER,
    "diff_to_baseline_se": _MAYBE_NUMBER,
    "resolved": {"type": ["boolean", "null"]},
    "curves": {"type": "array", "items": {"type": "array", "items": _CURVE_ROW}},
    "train_images_per_s": {"type": "array", "items": _NUMBER},
}
_INVOCATION = {
    "type": "object",
    "required": ["wall_seconds", "outcome"],
    "properties": {"wall_seconds": _NUMBER, "outcome": {"enum": ["finished", "interrupted", "failed"]}},
}
_VARIANT = {"type": "object", "required": list(_VARIANT_PROPERTIES), "properties": _VARIANT_PROPERTIES}
RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "gex compare results.json",
    "type": "object",
    "required": ["format", "task", "settings", "baseline", "variants", "runs", "wall_seconds", "cpu_seconds"],
    "properties": {
        "format": {"const": RESULTS_FORMAT},
        "task": {"type": "string"},
        "settings": {"type": "object", "required": ["epochs", "seeds", "train_images", "test_images", "jobs"]},
        "baseline": {"type": ["string", "null"]},
        "variants": {"type": "array", "minItems": 1, "items": _VARIANT},
        "runs": {"type": "array", "minItems": 1, "items": RUN_SCHEMA},
        "wall_seconds": _NUMBER,  # summed over the invocations into the sweep's folder
        "cpu_seconds": _NUMBER,
        # One per invocation of the sweep (gex compare, --resume): its wall time and how it ended.
        "invocations": {"type": "array", "items": _INVOCATION},
    },
}


def validate_results(results: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` where ``results`` does not follow :data:`RESULTS_SCHEMA`."""
    import jsonschema

    jsonschema.validate(results, RESULTS_SCHEMA)


def build_results(
    records: Sequence[dict[str, Any]],
    *,
    variants: Sequence[tuple[str, str]],
    complexity: dict[str, dict[str, int]],
    settings: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """Aggregate the run records: per variant the mean test error ± SE and the paired difference to the baseline.

    The baseline is the variant labelled ``baseline`` (else none, and the differences are ``null``).
    Differences pair each variant's run with the baseline's run of the same seed.
    """
    by_model: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        by_model.setdefault(record["model"], {})[record["seed"]] = record
    baseline = next((model for label, model in variants if label == "baseline"), None)
    entries = []
    for label, model in variants:
        runs = by_model.get(model, {})
        seeds = sorted(runs)
        errors = [runs[seed]["test_top1_err"] for seed in seeds]
        mean, se = mean_se(errors)
        entry: dict[str, Any] = {
            "label": label,
            "model": model,
            **complexity[model],
            "seeds": seeds,
            "test_top1_err": errors,
            "test_top5_err": [runs[seed]["test_top5_err"] for seed in seeds],
            "test_top1_err_mean": mean,
            "test_top1_err_se": _known(se),
            "diff_to_baseline": None,
            "diff_to_baseline_mean": None,
            "diff_to_baseline_se": None,
            "resolved": None,
            "curves": [runs[seed]["curve"] for seed in seeds],
            "train_images_per_s": [runs[seed]["train_images_per_s"] for seed in seeds],
        }
        if baseline is not None and model != baseline:
            base_runs = by_model.get(baseline, {})
            paired = [seed for seed in seeds if seed in base_runs]
            if paired:
                diffs = [runs[seed]["test_top1_err"] - base_runs[seed]["test_top1_err"] for seed in paired]
                diff, diff_se = paired_difference(
                    [runs[seed]["test_top1_err"] for seed in paired],
                    [base_runs[seed]["test_top1_err"] for seed in paired],
                )
                entry.update(
                    diff_to_baseline=diffs,
                    diff_to_baseline_mean=diff,
                    diff_to_baseline_se=_known(diff_se),
                    resolved=resolved(diff, diff_se),
                )
        entries.append(entry)
    return {
        "format": RESULTS_FORMAT,
        "task": "Fashion-MNIST, ResNet-20 family",
        "settings": settings,
        "baseline": baseline,
        "variants": entries,
        "runs": list(records),
        "wall_seconds": wall_seconds,
        "cpu_seconds": sum(record["cpu_seconds"] for record in records),
    }


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nan, ±inf) as ``None``: strict JSON has no such numbers
    (``NaN`` in a file breaks ``JSON.parse`` and other strict parsers), so they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def diverged_runs(results: dict[str, Any]) -> dict[str, list[int]]:
    """``{model: seeds}`` of the runs whose record says ``diverged``."""
    seeds: dict[str, list[int]] = {}
    for record in results["runs"]:
        if record.get("diverged"):
            seeds.setdefault(record["model"], []).append(record["seed"])
    return seeds


def _known(value: float) -> float | None:
    """``None`` for nan (JSON has no nan: an unknown value is null)."""
    return None if math.isnan(value) else value


def _pm(mean: float, se: float | None) -> str:
    return f"{mean:.2f}" if se is None else f"{mean:.2f} ± {se:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: test error mean ± SE over seeds, the paired difference to the baseline ± SE (* > 2 SE).

    A variant with a diverged run (non-finite loss) is marked ``†`` and named in a note below: the
    run's chance-level error stays in its mean and difference (it is what these settings gave), but
    a reader must not take such a row for the architecture's error.
    """
    counts = sorted({len(entry["seeds"]) for entry in results["variants"]})
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"  # a sweep still running
    lines = [
        f"| variant | model | params | MACs | test top-1 error % (mean ± SE, {seeds} seeds) "
        "| − baseline (paired by seed, ± SE) | train images/s per process |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    diverged = diverged_runs(results)
    for entry in results["variants"]:
        if entry["diff_to_baseline_mean"] is None:
            diff = "—"
        else:
            diff = f"{entry['diff_to_baseline_mean']:+.2f}"
            if entry["diff_to_baseline_se"] is not None:
                diff += f" ± {entry['diff_to_baseline_se']:.2f}"
            diff += " *" if entry["resolved"] else ""
        speed = sum(entry["train_images_per_s"]) / len(entry["train_images_per_s"])
        label = f"{entry['label']} †" if entry["model"] in diverged else entry["label"]
        lines.append(
            f"| {label} | `{entry['model']}` | {entry['params'] / 1e3:.1f} K | {entry['macs'] / 1e6:.2f} M "
            f"| {_pm(entry['test_top1_err_mean'], entry['test_top1_err_se'])} | {diff} | {speed:.0f} |"
        )
    lines.append("")
    lines.append("`*`: the difference is larger than twice its standard error.")
    if diverged:
        runs = ", ".join(
            f"{entry['label']} seed {seed}"
            for entry in results["variants"]
            for seed in diverged.get(entry["model"], [])
        )
        lines.append(
            f"`†`: diverged (non-finite loss; its chance-level error is in the mean and difference above): {runs}."
        )
    return "\n".join(lines)


def curves_title(results: dict[str, Any]) -> str:
    """The heading of ``curves.png`` (drawn by :func:`gather_excite.analysis.plot_curves`)."""
    settings = results["settings"]
    return (
        f"Fashion-MNIST, ResNet-20 (width {settings['width']}), {settings['train_images']} training images, "
        f"{len(settings['seeds'])} seeds: mean ± SE; validation: {settings['curve_test_images']} test images"
    )
