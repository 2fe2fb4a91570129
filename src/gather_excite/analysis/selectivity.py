"""Class selectivity index of every channel of a stage's unit outputs (Section 4, Figure 3).

Morcos et al. (2018): for a channel, take its activity on an image as the spatial mean of
its feature map, average that over the images of each class, and compare the largest of
these class-conditional means, ``mu_max``, with the mean of the others, ``mu_rest``::

    selectivity = (mu_max - mu_rest) / (mu_max + mu_rest)

For non-negative (post-ReLU) activity it lies in [0, 1]: 1 for a channel that fires for one
class only, 0 for one that responds equally to every class. A unit's activity is its output
after the first ReLU the network applies to it (:func:`~._units.activity_tap`): the unit's own
output for v1 ResNets and ShuffleNet, the next BN-ReLU's output for pre-activation networks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ._units import activity_tap
from .plotting import new_figure

__all__ = [
    "SelectivityAccumulator",
    "class_selectivity",
    "plot_selectivity",
    "selectivity_index",
    "selectivity_report",
]


def selectivity_index(class_means: torch.Tensor) -> torch.Tensor:
    """Selectivity index per channel of class-conditional means of shape ``(classes, channels)``.

    Where ``mu_max + mu_rest == 0`` (a channel silent for every class, after a ReLU) the index
    is defined as 0: the channel prefers no class.
    """
    if not isinstance(class_means, torch.Tensor) or class_means.ndim != 2:
        shape = getattr(class_means, "shape", class_means)
        raise ValueError(f"class_means must be a (classes, channels) tensor, got {shape!r}")
    classes = class_means.shape[0]
    if classes < 2:
        raise ValueError(f"class_means needs at least 2 classes to compare, got {classes}")
    mu_max = class_means.max(dim=0).values
    mu_rest = (class_means.sum(dim=0) - mu_max) / (classes - 1)
    denominator = mu_max + mu_rest
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(denominator), (mu_max - mu_rest) / safe)


class SelectivityAccumulator:
    """Class-conditional sums and counts of per-channel activity, accumulated batch by batch.

    Memory is ``classes x channels`` whatever the number of images, so an ImageNet
    validation set streams through it. Sums are kept in float64.
    """

    def __init__(self, num_classes: int, *, device: torch.device | str | None = None) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else None
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)

    def update(self, activations: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``activations`` of shape ``(N, C)`` or ``(N, C, H, W)``, ``labels`` of shape ``(N,)``."""
        if activations.ndim < 2:
            raise ValueError(f"activations must have shape (N, C, ...), got {tuple(activations.shape)}")
        if labels.shape != activations.shape[:1]:
            raise ValueError(f"labels must have shape ({activations.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.to(activations.device, torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        activity = activations.detach().to(torch.float64)
        if activity.ndim > 2:
            activity = activity.mean(dim=tuple(range(2, activity.ndim)))
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, activity.shape[1], dtype=torch.float64, device=activity.device)
            self.counts = self.counts.to(activity.device)
        elif activity.shape[1] != self.sums.shape[1]:
            raise ValueError(f"activations have {activity.shape[1]} channels, earlier batches had {self.sums.shape[1]}")
        self.sums.index_add_(0, labels, activity)
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    @property
    def images(self) -> int:
        """Number of images seen."""
        return int(self.counts.sum())

    def class_means(self) -> torch.Tensor:
        """Mean activity per class and channel, ``(classes seen, channels)``.

        Classes with no image are left out: their mean is undefined.
        """
        if self.sums is None:
            raise ValueError("no activations accumulated yet")
        seen = self.counts > 0
        return self.sums[seen] / self.counts[seen, None].to(torch.float64)

    def compute(self) -> torch.Tensor:
        """Selectivity index per channel, ``(channels,)`` float64 (needs at least two classes seen)."""
        return selectivity_index(self.class_means())


def _batch_inputs(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        return batch["image"], batch["label"]
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be (images, labels), got {type(batch).__name__}")


@torch.inference_mode()
def class_selectivity(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    units: Mapping[str, nn.Module],
    num_classes: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "selectivity",
) -> dict[str, SelectivityAccumulator]:
    """One streaming pass over ``loader``: an accumulator per unit of ``units`` (label -> module).

    Each unit's post-ReLU activity (:func:`~._units.activity_tap`: the unit's output for a v1
    ResNet or ShuffleNet unit, the BN-ReLU after it for a pre-activation unit) is reduced to
    per-channel spatial means inside a forward hook, so no feature map outlives its batch.
    """
    if not units:
        raise ValueError("units must name at least one module")
    taps = {label: activity_tap(model, module, name=f"unit {label!r}") for label, module in units.items()}
    device = torch.device(device)
    model.eval().to(device)
    accumulators = {label: SelectivityAccumulator(num_classes, device=device) for label in units}
    batch_activity: dict[str, torch.Tensor] = {}

    def make_hook(label: str):
        read = taps[label].read

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            activity = read(output)
            batch_activity[label] = activity.float().mean(dim=tuple(range(2, activity.ndim)))

        return hook

    handles = [tap.module.register_forward_hook(make_hook(label)) for label, tap in taps.items()]
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
            images, labels = _batch_inputs(batch)
            batch_activity.clear()
            model(images.to(device, non_blocking=True))
            labels = labels.to(device)
            for label, accumulator in accumulators.items():
                if label not in batch_activity:
                    raise ValueError(f"unit {label!r} did not run in the model's forward pass")
                accumulator.update(batch_activity[label], labels)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def selectivity_report(
    results: Sequence[tuple[dict[str, Any], Mapping[str, tuple[str, SelectivityAccumulator]]]],
    *,
    stage: str,
    num_classes: int,
) -> dict[str, Any]:
    """JSON-ready Figure 3 data: per model (a dict of its labels), per unit its selectivity indices.

    ``results`` holds ``(model_info, {unit label: (module path, accumulator)})`` per model;
    ``model_info`` should carry a ``"label"`` for the legend.
    """
    models = []
    for info, units in results:
        rows = []
        for label, (path, accumulator) in units.items():
            index = accumulator.compute()
            rows.append(
                {
                    "unit": label,
                    "path": path,
                    "channels": int(index.numel()),
                    "images": accumulator.images,
                    "mean": float(index.mean()),
                    # The mean of the two middle values of an even count (torch.median takes the lower one).
                    "median": float(index.quantile(0.5)),
                    "index": [round(float(v), 6) for v in index],
                }
            )
        models.append({**info, "units": rows})
    return {"analysis": "selectivity", "stage": stage, "num_classes": num_classes, "models": models}


def plot_selectivity(report: Mapping[str, Any], *, bins: int = 40) -> Figure:
    """Figure 3: one histogram panel per unit, the models' distributions overlaid."""
    labels: list[str] = []
    for model in report["models"]:
        labels += [row["unit"] for row in model["units"] if row["unit"] not in labels]
    if not labels:
        raise ValueError("the report holds no units to plot")
    values = [v for model in report["models"] for row in model["units"] for v in row["index"]]
    low, high = min(0.0, *values), max(1.0, *values)
    edges = np.linspace(low, high, bins + 1)
    fig, axes = new_figure(len(labels))
    for ax, unit in zip(axes, labels, strict=True):
        for model in report["models"]:
            row = next((r for r in model["units"] if r["unit"] == unit), None)
            if row is None:
                continue
            index = np.asarray(row["index"], dtype=float)
            # Fractions of channels, so models of different widths compare.
            ax.hist(
                index,
                bins=edges,
                weights=np.full(index.size, 1.0 / max(index.size, 1)),
                alpha=0.55,
                label=f"{model.get('label', model.get('model', '?'))} (mean {row['mean']:.3f})",
            )
        ax.set_title(unit)
        ax.set_xlabel("class selectivity index")
        ax.set_ylabel("fraction of channels")
        ax.legend(fontsize="small")
    fig.suptitle(f"Class selectivity, {report['stage']} ({report['num_classes']} classes)")
    return fig
