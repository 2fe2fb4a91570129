"""The main job: baseline, SE and GE ResNet-20s on Fashion-MNIST over several seeds, with error bars.

:func:`run_compare` runs a :class:`SweepConfig` (every variant x every seed, parallel processes,
resumable) into a folder and writes ``results.json`` (:data:`RESULTS_SCHEMA`) and ``curves.png``.
``gex compare`` is its command line; ``benchmarks/bench_sweep.py`` (:mod:`gather_excite.bench.sweep`)
measures its training speed against a plain eager PyTorch loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._atomic import write_json
from ..analysis import epoch_curves_report, plot_curves, save_png
from ..complexity import complexity
from ..errors import RunExistsError
from ..models import create_model
from .report import RESULTS_SCHEMA, build_results, curves_title, format_table, json_safe, validate_results
from .run import RunSpec, train_run
from .stats import mean_se, paired_difference, resolved
from .sweep import (
    DEFAULT_PRESET,
    PAPER_PRESET,
    VARIANTS,
    RunFailedError,
    SweepConfig,
    SweepInterrupted,
    available_cores,
    calibrate,
    check_folder,
    estimate_cpu_hours,
    finished_records,
    folder_config,
    resolve_device,
    run_sweep,
    sweep_invocations,
    sweep_wall_seconds,
)

__all__ = [
    "DEFAULT_PRESET",
    "PAPER_PRESET",
    "RESULTS_SCHEMA",
    "VARIANTS",
    "RunFailedError",
    "RunSpec",
    "SweepConfig",
    "SweepInterrupted",
    "available_cores",
    "build_results",
    "calibrate",
    "curves_title",
    "estimate_cpu_hours",
    "folder_config",
    "format_table",
    "mean_se",
    "paired_difference",
    "resolve_device",
    "resolved",
    "run_compare",
    "run_sweep",
    "summarize_finished",
    "sweep_invocations",
    "sweep_wall_seconds",
    "train_run",
    "validate_results",
]


def variant_complexity(model: str, *, width: int) -> dict[str, int]:
    """``params`` and ``macs`` of one 28x28 image through ``model`` (gate products not counted)."""
    counts = complexity(create_model(model, num_classes=10, in_chans=1, input_size=28, width=width), (1, 28, 28))
    return {"params": int(counts["params"]), "macs": int(counts["macs"])}


def _aggregate(config: SweepConfig, records: list[dict[str, Any]], *, jobs: int, wall_seconds: float) -> dict[str, Any]:
    """``results.json``'s object from the run records (variants without a finished run left out)."""
    finished = {record["model"] for record in records}
    variants = tuple((label, model) for label, model in config.variants if model in finished)
    first = records[0]
    settings = {
        **config.identity(),
        "data_root": config.data_root,
        "train_images": first["train_images"],
        "test_images": first["test_images"],
        "curve_test_images": first["curve_images"],
        "schedule": "SGD (Nesterov momentum 0.9, weight decay 5e-4), cosine learning rate over the epochs",
        "augmentation": "pad 2 + random 28x28 crop + horizontal flip" if config.augment else "none",
        "jobs": jobs,
        "threads_per_job": config.threads,
        "torch": torch.__version__,
    }
    return build_results(
        records,
        variants=variants,
        complexity={model: variant_complexity(model, width=config.width) for _label, model in variants},
        settings=settings,
        wall_seconds=wall_seconds,
    )


def run_compare(
    config: SweepConfig,
    out: Path,
    *,
    jobs: int,
    resume: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_done: Callable[[dict[str, Any], int, int], None] | None = None,
    on_epoch: Callable[[dict[str, Any], int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the sweep into ``out`` (see :func:`run_sweep`); write ``results.json`` (returned) and ``curves.png``.

    ``wall_seconds`` is the sweep's wall-clock time summed over every invocation into ``out``, this
    one included (interrupted ones too; :func:`sweep_wall_seconds`); ``invocations`` lists them.
    ``results.json`` is strict JSON: a diverged run's non-finite losses are null.
    """
    records = run_sweep(config, out, jobs=jobs, resume=resume, on_start=on_start, on_done=on_done, on_epoch=on_epoch)
    invocations = sweep_invocations(out)
    results = _aggregate(config, records, jobs=jobs, wall_seconds=sweep_wall_seconds(out))
    results["invocations"] = invocations
    results = json_safe(results)
    write_json(results, out / "results.json", allow_nan=False)
    report = epoch_curves_report([out / "results.json"], title=curves_title(results))
    save_png(plot_curves(report), out / "curves.png")
    return results


def summarize_finished(config: SweepConfig | None, out: Path) -> tuple[dict[str, Any], int]:
    """The results of the runs of ``config`` (``None``: the folder's own sweep, :func:`folder_config`)
    finished so far in ``out`` (no training, nothing written).

    Returns the results object (as :func:`run_compare` would, over those runs; ``wall_seconds`` is
    the sum of the runs' own) and the number of runs the sweep has in all. Raises like ``--resume``
    where ``out`` holds another sweep, and ``RunExistsError`` where no run has finished yet.
    """
    if not (out / "sweep.json").is_file():
        raise RunExistsError(f"--out {str(out)!r} holds no sweep (no sweep.json) to report on")
    config = folder_config(out) if config is None else config
    check_folder(out, config, resume=True, reading=True)
    runs = config.runs()
    done = finished_records(out, runs)
    records = [done[(spec.model, spec.seed)] for spec in runs if (spec.model, spec.seed) in done]
    if not records:
        raise RunExistsError(f"--out {str(out)!r}: no run has finished yet")
    wall = sum(record["wall_seconds"] for record in records)
    return _aggregate(config, records, jobs=0, wall_seconds=wall), len(runs)
