"""One training run of the sweep: a registered model, SGD + cosine schedule, batches built in memory.

The same training as ``gex train --config fashion_mnist_*`` (``create_model``, SGD with Nesterov
momentum and weight decay, the learning rate annealed by a cosine over the epochs, pad-2 crops and
flips), without Lightning's per-step machinery: the epoch's statistics stay on the device until the
epoch ends, and the test images are scored only where the curves need them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import create_model
from .data import TensorSplit, augment_batch

__all__ = ["RunSpec", "evaluate_split", "lightning_checkpoint", "train_run"]


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides one run's numbers (the sweep's settings plus the model and the seed)."""

    label: str
    model: str
    seed: int
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16
    augment: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = 1000
    # Torch's intra-op threads: a run's losses and errors depend on them (the order of float sums).
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunOutcome:
    """What a run reports (see :data:`gather_excite.compare.schema.RUN_SCHEMA`) and its final weights."""

    record: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def _build(spec: RunSpec, device: torch.device) -> nn.Module:
    # The model's initial weights depend on the seed only (the data stream has its own generator).
    torch.manual_seed(spec.seed)
    net = create_model(spec.model, num_classes=10, in_chans=1, input_size=28, width=spec.width)
    net = net.to(device)
    if spec.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


@torch.inference_mode()
def evaluate_split(
    net: nn.Module, split: TensorSplit, *, batch_size: int = 1000, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    """Per image of ``split`` (eval mode, on the CPU): cross-entropy ``loss``, ``top1`` and ``top5`` hit flags."""
    was_training = net.training
    net.eval()
    losses, top1, top5 = [], [], []
    for start in range(0, len(split), batch_size):
        index = slice(start, start + batch_size)
        images = split.normalised(index)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = net(images).float()
        targets = split.labels[index]
        losses.append(F.cross_entropy(logits, targets, reduction="none"))
        best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1.append(best5[:, 0] == targets)
        top5.append((best5 == targets[:, None]).any(dim=1))
    net.train(was_training)
    return {name: torch.cat(parts).cpu() for name, parts in (("loss", losses), ("top1", top1), ("top5", top5))}


def batch_bounds(images: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each training batch of an epoch: ``batch_size`` images each, the last one partial.

    A last batch of one image is merged into the one before: BatchNorm cannot train on one value per
    channel (GE-θ's and GE-θ+'s gathered 1x1 maps). Other partial batches stay as they are.
    """
    starts = list(range(0, images, batch_size))
    if len(starts) > 1 and images - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], images], strict=True))


def _error(correct: torch.Tensor) -> float:
    """Top-1/top-5 error in percent from hit flags (counted exactly, then divided in double precision)."""
    return 100.0 * (1.0 - int(correct.sum()) / correct.numel())


def _compiled(net: nn.Module, spec: RunSpec) -> tuple[nn.Module, str | None]:
    """``torch.compile(net)`` when asked; the eager network (and why) where compiling is unavailable."""
    if not spec.compile:
        return net, None
    try:
        return torch.compile(net), None
    except Exception as err:  # any compiler failure: the same network, eager
        return net, f"{type(err).__name__}: {err}"


def train_run(
    spec: RunSpec,
    train: TensorSplit,
    test: TensorSplit,
    *,
    curve_size: int | None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> RunOutcome:
    """Train ``spec`` on ``train``; score the curve subset after every epoch and all of ``test`` after the last.

    The curve subset is the first ``curve_size`` test images; its point after the last epoch is taken
    from the full test pass (same weights, same images), so the last epoch costs one test pass.
    ``on_epoch`` gets each epoch's row of the curve (``epoch``, the ``lr`` it trained with, losses,
    errors) as soon as it is scored: a run's progress while it runs. Threads are the caller's (the
    sweep sets ``spec.threads``). A run whose training or test loss is not finite is ``diverged``.
    """
    device = train.device
    net = _build(spec, device)
    model, compile_error = _compiled(net, spec)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    # The data stream: the same permutations, crops and flips for every variant of one seed.
    generator = torch.Generator().manual_seed(spec.seed)
    curve = test if curve_size is None or curve_size >= len(test) else TensorSplit(*_head(test, curve_size))
    batches = batch_bounds(len(train), spec.batch_size)
    history: list[dict[str, float]] = []
    train_seconds = train_cpu = 0.0
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    for epoch in range(1, spec.epochs + 1):
        net.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        wall, cpu = time.perf_counter(), time.process_time()
        lr = optimizer.param_groups[0]["lr"]  # this epoch's; the scheduler's step below sets the next one's
        for start, end in batches:
            index = order[start:end]
            images = augment_batch(train.images[index], generator) if spec.augment else train.normalised(index)
            if spec.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = train.labels[index]
            try:
                logits = model(images)
            except Exception as err:  # a compiler failure: the same step, eager
                if model is net:
                    raise
                model, compile_error = net, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                logits = model(images)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            correct += (logits.detach().argmax(1) == targets).sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - wall
        train_cpu += time.process_time() - cpu
        scheduler.step()
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(loss_sum) / len(train),
            "train_top1_err": 100.0 * (1.0 - float(correct) / len(train)),
        }
        if epoch < spec.epochs:
            scored = evaluate_split(net, curve, batch_size=spec.eval_batch_size, channels_last=spec.channels_last)
            row.update(curve_loss=float(scored["loss"].double().mean()), curve_top1_err=_error(scored["top1"]))
        else:
            final = evaluate_split(net, test, batch_size=spec.eval_batch_size, channels_last=spec.channels_last)
            head = slice(0, len(curve))
            row.update(
                curve_loss=float(final["loss"][head].double().mean()), curve_top1_err=_error(final["top1"][head])
            )
        history.append(row)
        if on_epoch is not None:
            on_epoch(dict(row))
    test_loss = float(final["loss"].double().mean())
    record = {
        "label": spec.label,
        "model": spec.model,
        "seed": spec.seed,
        "spec": spec.to_dict(),
        "test_top1_err": _error(final["top1"]),
        "test_top5_err": _error(final["top5"]),
        "test_loss": test_loss,
        "test_images": len(test),
        "train_images": len(train),
        "curve_images": len(curve),
        "curve": history,
        "steps": len(batches) * spec.epochs,
        "train_images_per_s": len(train) * spec.epochs / train_seconds,
        "train_images_per_cpu_s": len(train) * spec.epochs / train_cpu if train_cpu > 0 else math.nan,
        "wall_seconds": time.perf_counter() - started_wall,
        "cpu_seconds": time.process_time() - started_cpu,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "compiled": model is not net,
        "compile_error": compile_error,
        # Weights gone to nan/inf: the errors are then chance level, not the variant's (see format_table).
        "diverged": not all(math.isfinite(value) for value in [test_loss, *(row["train_loss"] for row in history)]),
    }
    return RunOutcome(record, {key: value.detach().cpu() for key, value in net.state_dict().items()})


def _head(split: TensorSplit, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return split.images[:size], split.labels[:size]


def lightning_checkpoint(record: dict[str, Any], state_dict: dict[str, torch.Tensor], data_root: str) -> dict[str, Any]:
    """A checkpoint ``gex eval``/``gex analyze``/``load_model`` read as a ``ClassificationModule`` one, with
    the data it was trained on (Fashion-MNIST in ``data_root``), as ``gex train`` records it."""
    import lightning as L

    spec = record["spec"]
    hyper_parameters = {
        "arch": spec["model"],
        "num_classes": 10,
        "in_chans": 1,
        "input_size": 28,
        "arch_kwargs": {"width": spec["width"]},
        "lr": spec["lr"],
        "momentum": spec["momentum"],
        "weight_decay": spec["weight_decay"],
        "nesterov": True,
        "schedule": "cosine",
    }
    return {
        "state_dict": {f"net.{key}": value for key, value in state_dict.items()},
        "hyper_parameters": hyper_parameters,
        "datamodule_hyper_parameters": {"dataset": "fashion_mnist", "root": str(data_root)},
        "epoch": spec["epochs"] - 1,
        "global_step": record["steps"],
        "pytorch-lightning_version": L.__version__,
    }
