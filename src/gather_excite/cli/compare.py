"""``gex compare``: train baseline, SE, GE-θ−, GE-θ and GE-θ+ ResNet-20s on Fashion-MNIST and compare them.

The main job of the README. Every run goes through the same engine as ``gex train``
(:class:`~gather_excite.engine.ClassificationModule`, the Fashion-MNIST datamodule, a Lightning
``Trainer`` on the CPU). After every epoch it measures the error on a fixed subset of the test
set (``--curve-size`` images, for the curves); the reported test error is the full 10k test set
after the last epoch. Final weights stay in ``OUT/checkpoints/<model>/seed<k>/last.ckpt``
(usable by ``gex eval``/``gex analyze``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..complexity import complexity
from ..data import DEFAULT_FASHION_MNIST_ROOT, ImageClassificationData
from ..engine import AtomicCheckpointIO, ClassificationModule, TrainSpeed, checkpoint_callbacks, write_eval_json
from ..errors import ConfigError, GexError, RunExistsError, one_line

__all__ = ["VARIANTS", "check_out_folder", "main", "run_compare"]


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that is a file or already holds a comparison, so no earlier run is overwritten."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder for results.json, curves.png, checkpoints, logs")
    earlier = [out / name for name in ("results.json", "curves.png", "checkpoints", "logs") if (out / name).exists()]
    if earlier:
        raise RunExistsError(
            f"--out {out} already holds a comparison ({earlier[0]}); choose another --out "
            f"(e.g. {out}-2) or remove it (nothing was overwritten)"
        )

# (label, model name) in the paper's order; every GE variant has global extent, as in Tables 2-5.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("baseline", "cifar_resnet20"),
    ("SE", "se_cifar_resnet20"),
    ("GE-θ−", "ge_theta_minus_cifar_resnet20"),
    ("GE-θ", "ge_theta_cifar_resnet20"),
    ("GE-θ+", "ge_theta_plus_cifar_resnet20"),
)


class _Progress(L.Callback):
    """One progress bar over every training step of every run, with the current run and its last errors."""

    def __init__(self, bar: tqdm, label: str) -> None:
        self.bar, self.label = bar, label

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        loss = trainer.callback_metrics.get("train/loss_step")
        postfix = f"{self.label} ep {trainer.current_epoch + 1}/{trainer.max_epochs}"
        if loss is not None:
            postfix += f" loss {float(loss):.3f}"
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(1)


class _History(L.Callback):
    """Per-epoch train loss/error and test-subset error of one run.

    An epoch's row is taken when the next epoch starts (or training ends): callbacks'
    ``on_train_epoch_end`` runs before the module logs its epoch errors, so reading there would
    give the previous epoch's training error.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def _record(self, trainer: L.Trainer) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        self.rows.append(
            {
                "epoch": len(self.rows) + 1,
                "train_loss": metrics.get("train/loss_epoch", math.nan),
                "train_top1_err": metrics.get("train/top1_err", math.nan),
                "curve_loss": metrics.get("val/loss", math.nan),
                "curve_top1_err": metrics.get("val/top1_err", math.nan),
                "curve_top5_err": metrics.get("val/top5_err", math.nan),
            }
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > len(self.rows):
            self._record(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)


def _spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_compare(
    *,
    out: Path,
    data_root: str,
    download: bool,
    epochs: int,
    seeds: int,
    train_size: int | None,
    curve_size: int | None,
    width: int,
    batch_size: int,
    lr: float,
    variants: list[tuple[str, str]],
    accelerator: str,
) -> dict[str, Any]:
    """Train every variant for every seed; return the results object written to ``results.json``."""
    data = ImageClassificationData(
        "fashion_mnist",
        data_root,
        batch_size=batch_size,
        eval_batch_size=500,
        num_workers=0,
        download=download,
        augment=False,
        train_subset=train_size,
        val_subset=curve_size,
        subset_seed=0,
    )
    data.setup("fit")  # loads the IDX files once; every run reuses the tensors
    test_set = data.val_set.dataset if isinstance(data.val_set, Subset) else data.val_set
    test_loader = DataLoader(test_set, batch_size=500)
    steps_per_epoch = len(data.train_dataloader())
    total_steps = steps_per_epoch * epochs * seeds * len(variants)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tqdm(total=total_steps, desc="gex compare", unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        for label, arch in variants:
            entry: dict[str, Any] = {"label": label, "model": arch, "seeds": [], "test_top1_err": [], "curves": []}
            entry["test_top5_err"], entry["train_images_per_s"], entry["seconds"] = [], [], []
            for seed in range(seeds):
                L.seed_everything(seed, workers=True, verbose=False)
                module = ClassificationModule(
                    arch,
                    num_classes=10,
                    in_chans=1,
                    input_size=28,
                    arch_kwargs={"width": width},
                    lr=lr,
                    weight_decay=5e-4,
                    nesterov=True,
                    schedule="cosine",
                )
                history, speed = _History(), TrainSpeed()
                run_dir = out / "checkpoints" / arch / f"seed{seed}"
                trainer = L.Trainer(
                    accelerator=accelerator,
                    devices=1,
                    max_epochs=epochs,
                    logger=L.pytorch.loggers.CSVLogger(str(out / "logs"), name=arch, version=f"seed{seed}"),
                    callbacks=[
                        *checkpoint_callbacks(run_dir, monitor=None),
                        history,
                        speed,
                        _Progress(bar, f"{label} seed {seed}"),
                    ],
                    plugins=[AtomicCheckpointIO()],
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                    log_every_n_steps=max(1, min(50, steps_per_epoch)),
                    deterministic=False,
                )
                run_start = time.perf_counter()
                trainer.fit(module, datamodule=data)
                if curve_size is None:
                    final = {key: history.rows[-1][key] for key in ("test_top1_err", "test_top5_err")}
                else:
                    tested = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
                    final = {"test_top1_err": tested["test/top1_err"], "test_top5_err": tested["test/top5_err"]}
                entry["seeds"].append(seed)
                entry["test_top1_err"].append(float(final["test_top1_err"]))
                entry["test_top5_err"].append(float(final["test_top5_err"]))
                entry["train_images_per_s"].append(speed.images_per_second)
                entry["seconds"].append(time.perf_counter() - run_start)
                entry["curves"].append(history.rows)
                bar.write(
                    f"{label:>9} seed {seed}: test top-1 error {final['test_top1_err']:.2f}%  "
                    f"{speed.images_per_second:.0f} train images/s"
                )
            counts = complexity(module.net, input_size=(1, 28, 28))
            entry["params"], entry["macs"] = int(counts["params"]), int(counts["macs"])
            entry["test_top1_err_mean"], entry["test_top1_err_std"] = _spread(entry["test_top1_err"])
            entry["train_images_per_s_mean"] = statistics.fmean(entry["train_images_per_s"])
            results.append(entry)
    return {
        "task": "Fashion-MNIST, ResNet-20 family",
        "settings": {
            "epochs": epochs,
            "seeds": seeds,
            "train_images": len(data.train_set or ()),
            "test_images": len(test_set),
            "curve_test_images": len(data.val_set or ()),
            "width": width,
            "batch_size": batch_size,
            "lr": lr,
            "schedule": "SGD (Nesterov momentum 0.9, weight decay 5e-4), cosine learning rate over the epochs",
            "augmentation": "none (normalisation only)",
            "data_root": data_root,
            "torch_threads": torch.get_num_threads(),
            "accelerator": accelerator,
        },
        "wall_seconds": time.perf_counter() - started,
        "variants": results,
    }


def format_table(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table (test error mean ± standard deviation over seeds)."""
    seeds = results["settings"]["seeds"]
    spread = f" (mean ± sd, {seeds} seeds)" if seeds > 1 else ""
    lines = [
        f"| variant | model | params | MACs | test top-1 error %{spread} | train images/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for entry in results["variants"]:
        error = f"{entry['test_top1_err_mean']:.2f}"
        if seeds > 1:
            error += f" ± {entry['test_top1_err_std']:.2f}"
        lines.append(
            f"| {entry['label']} | `{entry['model']}` | {entry['params'] / 1e3:.1f} K | {entry['macs'] / 1e6:.2f} M "
            f"| {error} | {entry['train_images_per_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    """``curves.png``: test and training top-1 error per epoch of every variant (mean over seeds, range shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for entry in results["variants"]:
        for axis, key in zip(axes, ("curve_top1_err", "train_top1_err"), strict=True):
            runs = [[row[key] for row in curve] for curve in entry["curves"]]
            epochs = [row["epoch"] for row in entry["curves"][0]]
            columns = list(zip(*runs, strict=True))
            mean = [statistics.fmean(column) for column in columns]
            (line,) = axis.plot(epochs, mean, marker="o", markersize=3, label=entry["label"])
            if len(runs) > 1:
                axis.fill_between(
                    epochs, list(map(min, columns)), list(map(max, columns)), color=line.get_color(), alpha=0.15
                )
    settings = results["settings"]
    curve_title = f"test top-1 error (%), {settings['curve_test_images']} test images"
    for axis, title in zip(axes, (curve_title, "training top-1 error (%)"), strict=True):
        axis.set_xlabel("epoch")
        axis.set_ylabel(title)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(
        f"Fashion-MNIST, ResNet-20 (width {settings['width']}), {settings['train_images']} training images, "
        f"{settings['seeds']} seed(s)"
    )
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gex compare",
        description="Train baseline, SE, GE-θ−, GE-θ and GE-θ+ ResNet-20s on Fashion-MNIST (CPU by default) and "
        "compare params, MACs, test error and training speed. Defaults fit about 10 minutes on 2 CPU cores; "
        "raise --epochs, --seeds and --train-size for a real comparison.",
    )
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT, help="folder with the IDX files")
    parser.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST there")
    parser.add_argument("--out", default="runs/compare", help="writes results.json, curves.png, checkpoints, logs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per variant; the table shows mean ± sd")
    parser.add_argument("--train-size", type=int, default=6000, help="training images (0: all 60000)")
    parser.add_argument(
        "--curve-size", type=int, default=2000, help="test images scored after every epoch (0: all 10000)"
    )
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (16: ResNet-20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, or 1 when the load average already fills the cores, "
        "where OpenMP spin-waiting makes several threads far slower)",
    )
    parser.add_argument("--accelerator", default="cpu", help="cpu (default), gpu or auto")
    parser.add_argument(
        "--variants",
        default=",".join(label for label, _ in VARIANTS),
        help="comma-separated subset of: " + ", ".join(label for label, _ in VARIANTS),
    )
    return parser


def _machine_is_busy() -> bool:
    """Whether other processes already keep every core busy (1-minute load average >= cores)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        return False


def _positive(name: str, value: int, *, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the table, write ``results.json`` and ``curves.png`` under ``--out``."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    # 5 variants x seeds Trainers: keep Lightning's per-Trainer banners out of the table's way.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        for name in ("epochs", "seeds", "width", "batch_size"):
            _positive(name.replace("_", "-"), getattr(args, name))
        _positive("train-size", args.train_size, minimum=0)
        _positive("curve-size", args.curve_size, minimum=0)
        by_label = dict(VARIANTS)
        wanted = [label.strip() for label in args.variants.split(",") if label.strip()]
        unknown = [label for label in wanted if label not in by_label]
        if unknown or not wanted:
            raise ValueError(f"--variants: unknown {unknown or wanted!r}; choose from {', '.join(by_label)}")
        if args.threads is not None:
            _positive("threads", args.threads)
            torch.set_num_threads(args.threads)
        elif _machine_is_busy():
            torch.set_num_threads(1)
        out = Path(args.out)
        check_out_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        results = run_compare(
            out=out,
            data_root=args.data_root,
            download=args.download,
            epochs=args.epochs,
            seeds=args.seeds,
            train_size=args.train_size or None,
            curve_size=args.curve_size or None,
            width=args.width,
            batch_size=args.batch_size,
            lr=args.lr,
            variants=[(label, by_label[label]) for label in wanted],
            accelerator=args.accelerator,
        )
    except (ValueError, FileNotFoundError, GexError) as err:
        print(f"gex compare: error: {one_line(err)}", file=sys.stderr)
        return 2
    write_eval_json(results, out / "results.json")
    plot_curves(results, out / "curves.png")
    print()
    print(format_table(results))
    threads = results["settings"]["torch_threads"]
    print(
        f"\n{results['wall_seconds'] / 60:.1f} min on {threads} CPU thread(s); "
        f"wrote {out / 'results.json'} and {out / 'curves.png'}"
    )
    return 0
