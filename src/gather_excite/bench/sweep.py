"""Training speed of the sweep's fast loop against a plain eager PyTorch loop, measured in the same run.

The plain loop is how the engine trained ``gex compare``'s runs before: one process using every
core (torch's default threads), a ``DataLoader`` over the per-image dataset with the recipe's
per-image crop and flip, the network in the default (NCHW) layout. The fast loop is
:func:`gather_excite.compare.run.train_run`: ``jobs`` spawned processes with one thread each, the
split held as one uint8 tensor, whole-batch augmentation, channels_last. Both train the same model
with the same batch size and optimiser. Each round times both (the order alternates), and the
report gives, per model, the median over rounds of

- wall-clock training images per second (all processes together for the fast loop), and
- training images per CPU-second of each process (what a core delivers, which a machine shared
  with other jobs disturbs less than the wall clock).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..compare.data import TensorSplit, load_fashion_mnist
from ..compare.run import RunSpec, train_run
from ..data import fashion_mnist_dataset
from ..data.transforms import build_normalized_augment
from ..models import create_model

__all__ = ["bench_sweep", "fast_loop_speed", "format_bench", "plain_loop_speed"]


def plain_loop_speed(
    model: str, *, data_root: str, steps: int, warmup: int, batch_size: int, threads: int, width: int = 16
) -> dict[str, float]:
    """Images/s (wall) and images per CPU-second of ``steps`` eager training steps after ``warmup`` ones."""
    torch.set_num_threads(threads)
    transform = build_normalized_augment(stats="fashion_mnist", crop_size=28, padding=2)
    dataset = fashion_mnist_dataset(data_root, train=True, normalize=True, transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    torch.manual_seed(0)
    net = create_model(model, num_classes=10, in_chans=1, input_size=28, width=width)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    net.train()
    batches = iter(loader)
    wall = cpu = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            wall, cpu = time.perf_counter(), time.process_time()
        images, targets = next(batches)
        loss = F.cross_entropy(net(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    images_done = steps * batch_size
    return {
        "images_per_s": images_done / (time.perf_counter() - wall),
        "images_per_cpu_s": images_done / (time.process_time() - cpu),
    }


def _fast_worker(
    model: str, data_root: str, steps: int, warmup: int, batch_size: int, compile: bool, barrier: Any, queue: Any
) -> None:
    torch.set_num_threads(1)
    train = load_fashion_mnist(data_root, train=True).subset(batch_size * max(steps, warmup), seed=0)
    test = TensorSplit(train.images[:batch_size], train.labels[:batch_size])
    spec = RunSpec(label=model, model=model, seed=0, epochs=1, batch_size=batch_size, compile=compile)
    warm = TensorSplit(train.images[: batch_size * warmup], train.labels[: batch_size * warmup])
    started = time.perf_counter()
    train_run(spec, warm, test, curve_size=None)  # first steps: allocator, kernels, compilation
    warmup_seconds = time.perf_counter() - started
    barrier.wait()
    start = time.time()
    record = train_run(spec, train, test, curve_size=None).record
    images = record["train_images"]
    queue.put(
        {
            "start": start,
            "end": start + images / record["train_images_per_s"],
            "images": images,
            "images_per_cpu_s": record["train_images_per_cpu_s"],
            "warmup_seconds": warmup_seconds,
            "compiled": record["compiled"],
        }
    )


def fast_loop_speed(
    model: str, *, data_root: str, steps: int, warmup: int, batch_size: int, jobs: int, compile: bool = False
) -> dict[str, float]:
    """Images/s (wall, all ``jobs`` processes) and images per CPU-second per process of the sweep's loop."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(jobs), context.Queue()
    args = (model, data_root, steps, warmup, batch_size, compile, barrier, queue)
    workers = [context.Process(target=_fast_worker, args=args) for _ in range(jobs)]
    for worker in workers:
        worker.start()
    reports = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {
        "images_per_s": sum(r["images"] for r in reports) / wall,
        "images_per_cpu_s": statistics.fmean(r["images_per_cpu_s"] for r in reports),
        "warmup_seconds": max(r["warmup_seconds"] for r in reports),
        "compiled": all(r["compiled"] for r in reports),
    }


def bench_sweep(
    *,
    models: tuple[str, ...],
    data_root: str,
    steps: int = 20,
    warmup: int = 3,
    batch_size: int = 128,
    rounds: int = 3,
    jobs: int | None = None,
    plain_threads: tuple[int, ...] | None = None,
    compile: bool = False,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Per model: each loop's speed per round, the medians, and each fast loop's ratio to each plain loop.

    ``plain_threads`` defaults to (cores, 1): the plain loop on every core (torch's default, the
    engine's speed on an idle machine) and on one thread (what ``gex compare`` chose on a busy
    machine, where OpenMP's spin-waiting makes several threads far slower).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = jobs or cores
    plain_threads = tuple(dict.fromkeys(plain_threads or (cores, 1)))
    rows = []
    for model in models:
        kinds = [f"plain {threads}t" for threads in plain_threads] + ["fast"] + (["fast+compile"] if compile else [])
        samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
        for round_ in range(rounds):
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                load = os.getloadavg()[0]
                common = {"data_root": data_root, "steps": steps, "warmup": warmup, "batch_size": batch_size}
                if kind.startswith("plain"):
                    speed = plain_loop_speed(model, threads=int(kind.split()[1][:-1]), **common)
                else:
                    speed = fast_loop_speed(model, jobs=jobs, compile=kind == "fast+compile", **common)
                speed["load_average"] = load
                samples[kind].append(speed)
                if progress is not None:
                    progress(model, kind, round_, speed)
        row: dict[str, Any] = {
            "model": model,
            "cores": cores,
            "jobs": jobs,
            "batch_size": batch_size,
            "steps": steps,
            "rounds": rounds,
            "samples": samples,
            "load_average_median": statistics.median(s["load_average"] for runs in samples.values() for s in runs),
        }
        for kind, runs in samples.items():
            for key in ("images_per_s", "images_per_cpu_s"):
                row[f"{kind}: {key}"] = statistics.median(run[key] for run in runs)
        for kind in kinds:
            for base in kinds:
                if kind.startswith("fast") and base.startswith("plain"):
                    # Paired by round: each round's fast figure over the same round's plain figure.
                    for key in ("images_per_s", "images_per_cpu_s"):
                        ratios = [f[key] / p[key] for f, p in zip(samples[kind], samples[base], strict=True)]
                        row[f"{kind} / {base}: {key}"] = statistics.median(ratios)
        rows.append(row)
    return rows


def format_bench(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`bench_sweep`'s medians, and each fast loop's ratios to every plain loop."""
    lines = [
        "| model | loop | train images/s (wall) | images per CPU-s per process | wall x plain | CPU x plain |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        plains = [kind for kind in row["samples"] if kind.startswith("plain")]
        for kind in row["samples"]:
            if kind.startswith("plain"):
                what, wall_ratio, cpu_ratio = f"plain, 1 process x {kind.split()[1][:-1]} threads", "", ""
            else:
                what = f"{kind}, {row['jobs']} processes x 1 thread"
                wall_ratio = " / ".join(f"{row[f'{kind} / {p}: images_per_s']:.2f}" for p in plains)
                cpu_ratio = " / ".join(f"{row[f'{kind} / {p}: images_per_cpu_s']:.2f}" for p in plains)
            lines.append(
                f"| `{row['model']}` | {what} | {row[f'{kind}: images_per_s']:.0f} "
                f"| {row[f'{kind}: images_per_cpu_s']:.0f} | {wall_ratio} | {cpu_ratio} |"
            )
    plains = " / ".join(kind for kind in rows[0]["samples"] if kind.startswith("plain")) if rows else ""
    lines.append(f"\nRatios: median over rounds of fast / plain of the same round, against {plains}.")
    return "\n".join(lines)
