"""Feature importance and pruning by the excite gate (Section 4, Figure 5).

For a residual unit of a GE (or SE) model and each evaluation image, the unit's channels
are ranked by their excite gate (averaged over space for a non-global extent) and the
``round(ratio * C)`` least important ("asc.") or most important ("des.") of them are
zeroed in the gate, which zeroes them in the residual branch. Ratio 0 is the model itself;
ratio 1 drops the whole branch, so only the identity passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ..layers import GateProbe
from ._units import find_gate_probe
from .plotting import new_figure
from .selectivity import _batch_inputs

__all__ = [
    "ORDERS",
    "GatePruner",
    "check_ratios",
    "plot_prune",
    "prune_curves",
    "prune_mask",
    "pruned_count",
    "remove_branch",
]

ORDERS = ("asc", "des")


def check_ratios(ratios: Iterable[float]) -> list[float]:
    """Validate prune ratios: a non-empty list of numbers in [0, 1], returned sorted without repeats."""
    try:
        values = sorted({float(r) for r in ratios})
    except (TypeError, ValueError):
        raise TypeError(f"ratios must be numbers in [0, 1], got {ratios!r}") from None
    if not values or values[0] < 0 or values[-1] > 1:
        raise ValueError(f"ratios must be a non-empty list of numbers in [0, 1], got {ratios!r}")
    return values


def pruned_count(ratio: float, channels: int) -> int:
    """Number of channels a prune ratio zeroes: ``round(ratio * channels)`` (half to even)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    return round(ratio * channels)


def prune_mask(gate: torch.Tensor, *, ratio: float, order: str) -> torch.Tensor:
    """Per-image keep mask ``(N, C)`` of 0/1: the ranked channels a prune ratio zeroes are 0.

    Channels are ranked by the gate averaged over space, ascending with ties kept in channel
    order; "asc" drops the first ``k`` of that ranking, "des" the last ``k``, so at ratio 0.5
    (even C) the two orders drop complementary channel sets.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if gate.ndim not in (2, 4):
        raise ValueError(f"gate must have shape (N, C) or (N, C, H, W), got {tuple(gate.shape)}")
    importance = gate.float().mean(dim=(2, 3)) if gate.ndim == 4 else gate.float()
    channels = importance.shape[1]
    k = pruned_count(ratio, channels)
    ranking = importance.argsort(dim=1, stable=True)
    dropped = ranking[:, :k] if order == "asc" else ranking[:, channels - k :]
    mask = torch.ones_like(importance)
    return mask.scatter_(1, dropped, 0.0)


class GatePruner:
    """Forward hook on a :class:`GateProbe` that zeroes the gate of ranked channels.

    Set ``ratio`` and ``order`` between forward passes; at ratio 0 the gate passes unchanged.
    Use as a context manager, which installs the hook on entry and removes it on exit.
    """

    def __init__(self, probe: GateProbe, *, ratio: float = 0.0, order: str = "asc") -> None:
        if not isinstance(probe, GateProbe):
            raise TypeError(f"probe must be a GateProbe, got {type(probe).__name__}")
        self.probe = probe
        self.ratio = ratio
        self.order = order
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: nn.Module, args: Any, gate: torch.Tensor) -> torch.Tensor | None:
        if self.ratio == 0:
            return None
        mask = prune_mask(gate, ratio=self.ratio, order=self.order)
        return gate * mask.to(gate.dtype).view(*mask.shape, *([1] * (gate.ndim - 2)))

    def __enter__(self) -> GatePruner:
        self._handle = self.probe.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@contextlib.contextmanager
def remove_branch(unit: nn.Module) -> Iterator[None]:
    """Within the block, ``unit``'s residual branch outputs zeros (a hook on ``unit.context``; while it
    is registered the unit's :class:`~gather_excite.layers.NormContext` runs the context as a module,
    also with gradients on)."""
    context = getattr(unit, "context", None)
    if not isinstance(context, nn.Module):
        raise ValueError(f"unit {type(unit).__name__} has no `context` module: not a residual unit")
    with context.register_forward_hook(lambda module, args, output: torch.zeros_like(output)):
        yield


def _gate_channels(unit: nn.Module, probe: GateProbe, label: str) -> int:
    for module in unit.context.modules():
        if getattr(module, "gate", None) is probe and isinstance(getattr(module, "channels", None), int):
            return module.channels
    raise ValueError(f"unit {label!r}: cannot tell the channel count of its excite gate")


@torch.inference_mode()
def prune_curves(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    units: Mapping[str, tuple[str, nn.Module]],
    ratios: Sequence[float],
    baseline: nn.Module | None = None,
    baseline_units: Mapping[str, tuple[str, nn.Module]] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 accuracy (%) against prune ratio, asc. and des., for each unit (label -> (path, module)).

    One pass over ``loader``: each batch runs the model as is, with each unit's branch
    removed, and with each (unit, order, ratio) pruning; a ``baseline`` (with its units of
    the same labels) adds its own accuracy and its branch-removed accuracies.
    """
    if not units:
        raise ValueError("units must name at least one unit")
    ratios = check_ratios(ratios)
    if baseline is not None and (baseline_units is None or set(baseline_units) != set(units)):
        raise ValueError(f"baseline_units must hold the same unit labels as units {sorted(units)}")
    device = torch.device(device)
    model.eval().to(device)
    if baseline is not None:
        baseline.eval().to(device)

    pruners = {}
    runs: dict[str, dict[str, tuple[str, int]]] = {}  # label -> {"asc@0.5": config key}
    for label, (_, unit) in units.items():
        probe = find_gate_probe(unit, name=f"unit {label!r}")
        channels = _gate_channels(unit, probe, label)
        pruners[label] = (GatePruner(probe), channels)
        runs[label] = {}
        for order in ORDERS:
            for ratio in ratios:
                k = pruned_count(ratio, channels)
                # Dropping none or all channels is the same for both orders: run it once.
                runs[label][f"{order}@{ratio}"] = ("both" if k in (0, channels) else order, k)

    correct: dict[tuple, int] = {}
    total = 0

    def count(key: tuple, net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        correct[key] = correct.get(key, 0) + int((net(images).argmax(dim=1) == labels).sum())

    for batch in tqdm(loader, desc="prune", disable=not progress, unit="batch"):
        images, labels = _batch_inputs(batch)
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        total += labels.numel()
        count(("model",), model, images, labels)
        for label, (_, unit) in units.items():
            with remove_branch(unit):
                count(("model_removed", label), model, images, labels)
        if baseline is not None:
            count(("baseline",), baseline, images, labels)
            for label, (_, unit) in baseline_units.items():
                with remove_branch(unit):
                    count(("baseline_removed", label), baseline, images, labels)
        for label, (pruner, channels) in pruners.items():
            with pruner:
                for order, k in sorted(set(runs[label].values())):
                    pruner.order = "asc" if order == "both" else order
                    pruner.ratio = k / channels
                    count(("pruned", label, order, k), model, images, labels)
    if total == 0:
        raise ValueError("the loader yielded no images")

    def accuracy(key: tuple) -> float:
        return 100.0 * correct[key] / total

    rows = []
    for label, (path, _) in units.items():
        channels = pruners[label][1]
        row: dict[str, Any] = {
            "unit": label,
            "path": path,
            "channels": channels,
            "pruned": [pruned_count(r, channels) for r in ratios],
        }
        for order in ORDERS:
            row[order] = [accuracy(("pruned", label, *runs[label][f"{order}@{r}"])) for r in ratios]
        row["model_ratio0"] = accuracy(("model",))
        row["model_ratio1"] = accuracy(("model_removed", label))
        if baseline is not None:
            row["baseline_path"] = baseline_units[label][0]
            row["baseline_ratio0"] = accuracy(("baseline",))
            row["baseline_ratio1"] = accuracy(("baseline_removed", label))
        rows.append(row)
    return {"analysis": "prune", "images": total, "ratios": ratios, "units": rows}


def plot_prune(report: Mapping[str, Any]) -> Figure:
    """Figure 5: top-1 accuracy against prune ratio per unit; des. solid, asc. dashed, references as stars."""
    rows = report["units"]
    if not rows:
        raise ValueError("the report holds no units to plot")
    model_label = report.get("model", {}).get("label", "model")
    baseline_label = (report.get("baseline") or {}).get("label", "baseline")
    fig, axes = new_figure(len(rows))
    for ax, row in zip(axes, rows, strict=True):
        ax.plot(report["ratios"], row["des"], "-o", color="tab:blue", markersize=3, label=f"{model_label} des.")
        ax.plot(report["ratios"], row["asc"], "--o", color="tab:orange", markersize=3, label=f"{model_label} asc.")
        ax.plot(
            [0, 1],
            [row["model_ratio0"], row["model_ratio1"]],
            "D",
            color="tab:green",
            linestyle="none",
            label=f"{model_label} ratio 0 / branch removed",
        )
        if "baseline_ratio0" in row:
            ax.plot(
                [0, 1],
                [row["baseline_ratio0"], row["baseline_ratio1"]],
                "*",
                color="black",
                markersize=11,
                linestyle="none",
                label=f"{baseline_label} ratio 0 / 1",
            )
        ax.set_title(f"{row['unit']} ({row['channels']} channels)")
        ax.set_xlabel("prune ratio")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"Pruning by excite gate importance ({report['images']} images)")
    return fig
