"""The paper's Section 4 analyses: class selectivity (Fig. 3), gate pruning (Fig. 5), error curves (Figs. 2, 4).

Each analysis computes a JSON-ready report and draws its figure from that report alone, so a
figure can be re-rendered from the JSON that ``gex analyze`` writes.
"""

from ._units import find_gate_probe, resolve_unit, stage_units, unit_label
from .curves import epoch_curves_report, extent_report, model_extent, plot_curves, read_metrics, read_run
from .plotting import load_report, new_figure, save_png, write_report
from .prune import ORDERS, GatePruner, check_ratios, plot_prune, prune_curves, prune_mask, pruned_count, remove_branch
from .selectivity import (
    SelectivityAccumulator,
    class_selectivity,
    plot_selectivity,
    selectivity_index,
    selectivity_report,
)

PLOTS = {"selectivity": plot_selectivity, "prune": plot_prune, "curves": plot_curves}

__all__ = [
    "ORDERS",
    "PLOTS",
    "GatePruner",
    "SelectivityAccumulator",
    "check_ratios",
    "class_selectivity",
    "epoch_curves_report",
    "extent_report",
    "find_gate_probe",
    "load_report",
    "model_extent",
    "new_figure",
    "plot_curves",
    "plot_prune",
    "plot_selectivity",
    "prune_curves",
    "prune_mask",
    "pruned_count",
    "read_metrics",
    "read_run",
    "remove_branch",
    "resolve_unit",
    "save_png",
    "selectivity_index",
    "selectivity_report",
    "stage_units",
    "unit_label",
    "write_report",
]
