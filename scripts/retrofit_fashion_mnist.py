#!/usr/bin/env python
"""Retrofit GE into a trained baseline on Fashion-MNIST, fine-tune, compare with the baseline trained as long.

For every seed: train a baseline ResNet-20 for ``--epochs`` epochs (SGD, cosine learning rate,
as ``gex compare``); then, from its checkpoint, fine-tune for ``--finetune-epochs`` epochs at
``--finetune-lr`` (cosine) (a) the baseline itself and (b) each GE variant built with
``create_model(..., pretrained=CHECKPOINT, context_init="identity")``. Every fine-tuning run of a
seed sees the same batches in the same order. The test error is measured on a fixed subset of
the test set before and after fine-tuning; the table gives the mean ± standard error over seeds
and the paired difference to the baseline's continuation.

Usage: .venv/bin/python scripts/retrofit_fashion_mnist.py --out runs/retrofit [--seeds 3 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from gather_excite.data import DEFAULT_FASHION_MNIST_ROOT, ImageClassificationData
from gather_excite.engine import AtomicCheckpointIO, ClassificationModule, checkpoint_callbacks

VARIANTS = (
    ("baseline", "cifar_resnet20"),
    ("GE-θ−", "ge_theta_minus_cifar_resnet20"),
    ("GE-θ", "ge_theta_cifar_resnet20"),
    ("GE-θ+", "ge_theta_plus_cifar_resnet20"),
)


def _trainer(epochs: int, out: Path | None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        callbacks=checkpoint_callbacks(out, monitor=None) if out is not None else [],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=out is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _test_error(module: ClassificationModule, loader: DataLoader) -> float:
    result = _trainer(1, None).test(module, dataloaders=loader, verbose=False)[0]
    return float(result["test/top1_err"])


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One seed: train the baseline, then fine-tune it and every retrofit; the test errors before and after."""
    out = Path(args.out)
    data = ImageClassificationData(
        "fashion_mnist",
        args.data_root,
        batch_size=args.batch_size,
        eval_batch_size=1000,
        num_workers=0,
        augment=False,
        train_subset=args.train_size,
        subset_seed=0,
    )
    data.setup("fit")
    test_full = data.val_set.dataset if isinstance(data.val_set, Subset) else data.val_set
    generator = torch.Generator().manual_seed(0)
    test_indices = torch.randperm(len(test_full), generator=generator)[: args.test_size].tolist()
    test_loader = DataLoader(Subset(test_full, test_indices), batch_size=1000)
    common = {"num_classes": 10, "in_chans": 1, "input_size": 28, "arch_kwargs": {"width": 16}}
    optim = {"momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": "cosine"}
    started = time.perf_counter()
    if args.scratch:
        return _scratch_seed(args, seed, data, test_loader, common, optim, started)
    L.seed_everything(seed, workers=True, verbose=False)
    base_dir = out / f"seed{seed}" / "baseline"
    base = ClassificationModule("cifar_resnet20", lr=args.lr, **common, **optim)
    _trainer(args.epochs, base_dir).fit(base, datamodule=data)
    checkpoint = str(base_dir / "last.ckpt")
    pretrained_err = _test_error(base, test_loader)
    print(f"seed {seed}: baseline after {args.epochs} epochs: test error {pretrained_err:.2f}%", flush=True)
    rows: dict[str, dict[str, float]] = {}
    for label, arch in VARIANTS:
        module = ClassificationModule(
            arch,
            lr=args.finetune_lr,
            pretrained=checkpoint,
            context_init=None if arch == "cifar_resnet20" else "identity",
            **common,
            **optim,
        )
        before = _test_error(module, test_loader)
        L.seed_everything(1000 + seed, workers=True, verbose=False)  # same batches for every variant
        _trainer(args.finetune_epochs, None).fit(module, datamodule=data)
        after = _test_error(module, test_loader)
        rows[label] = {"start": before, "end": after}
        print(f"seed {seed}: {label:>8}: test error {before:.2f}% at the start, {after:.2f}% after", flush=True)
    settings = {
        "train_images": args.train_size,
        "test_images": args.test_size,
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "lr": args.lr,
        "finetune_lr": args.finetune_lr,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    return {
        "seed": seed,
        "settings": settings,
        "baseline_pretrained_err": pretrained_err,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def _scratch_seed(
    args: argparse.Namespace,
    seed: int,
    data: ImageClassificationData,
    test_loader: DataLoader,
    common: dict[str, Any],
    optim: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The reference for the retrofits: each GE variant trained from scratch exactly as the baseline was, then
    fine-tuned as the baseline was (same seeds, same batches)."""
    rows: dict[str, dict[str, float]] = {}
    for label, arch in VARIANTS[1:]:
        L.seed_everything(seed, workers=True, verbose=False)
        run_dir = Path(args.out) / f"seed{seed}" / arch
        module = ClassificationModule(arch, lr=args.lr, **common, **optim)
        _trainer(args.epochs, run_dir).fit(module, datamodule=data)
        before = _test_error(module, test_loader)
        module = ClassificationModule(
            arch, lr=args.finetune_lr, pretrained=str(run_dir / "last.ckpt"), **common, **optim
        )
        L.seed_everything(1000 + seed, workers=True, verbose=False)
        _trainer(args.finetune_epochs, None).fit(module, datamodule=data)
        after = _test_error(module, test_loader)
        rows[f"{label} from scratch"] = {"start": before, "end": after}
        print(f"seed {seed}: {label} from scratch: test error {before:.2f}%, {after:.2f}% after", flush=True)
    return {"seed": seed, "rows": rows, "seconds": time.perf_counter() - started}


def summarise(out: Path) -> dict[str, Any]:
    """Mean ± standard error over the ``seed*.json`` files in ``out`` and the paired differences to the baseline."""
    seeds = [json.loads(path.read_text()) for path in sorted(out.glob("seed*.json")) if path.stem[4:].isdigit()]
    if not seeds:
        raise FileNotFoundError(f"no seed<k>.json in {out}")
    variants = list(VARIANTS)
    scratch_files = [out / f"seed{seed['seed']}_scratch.json" for seed in seeds]
    if all(path.is_file() for path in scratch_files):  # the from-scratch reference, where it was run
        for seed, path in zip(seeds, scratch_files, strict=True):
            seed["rows"].update(json.loads(path.read_text())["rows"])
        variants += [(f"{label} from scratch", arch) for label, arch in VARIANTS[1:]]
    summary = []
    for label, arch in variants:
        start = [seed["rows"][label]["start"] for seed in seeds]
        end = [seed["rows"][label]["end"] for seed in seeds]
        diff = [seed["rows"][label]["end"] - seed["rows"]["baseline"]["end"] for seed in seeds]
        summary.append(
            {
                "label": label,
                "model": arch,
                "start_mean_se": _mean_se(start),
                "end_mean_se": _mean_se(end),
                "minus_baseline_mean_se": _mean_se(diff),
                "start_per_seed": start,
                "end_per_seed": end,
            }
        )
    return {
        "settings": {**seeds[0]["settings"], "seeds": [seed["seed"] for seed in seeds]},
        "baseline_pretrained_err": _mean_se([seed["baseline_pretrained_err"] for seed in seeds]),
        "variants": summary,
        "seconds_per_seed": [seed["seconds"] for seed in seeds],
    }


def table(results: dict[str, Any]) -> str:
    """Markdown table: test error (mean ± s.e. over seeds) at the start and end of fine-tuning."""
    s = results["settings"]
    lines = [
        f"| variant | test error % before fine-tuning | after {s['finetune_epochs']} more epochs "
        "| difference to the baseline (paired) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in results["variants"]:
        cells = [
            f"{row[key][0]:.2f} ± {row[key][1]:.2f}"
            for key in ("start_mean_se", "end_mean_se", "minus_baseline_mean_se")
        ]
        if row["label"] == "baseline":
            cells[2] = "—"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT)
    parser.add_argument("--out", default="runs/retrofit")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds to run (one process each is fine)")
    parser.add_argument("--summarise", action="store_true", help="only summarise the seed*.json files in --out")
    parser.add_argument(
        "--scratch", action="store_true", help="the reference: train each GE variant from scratch as the baseline was"
    )
    parser.add_argument("--train-size", type=int, default=3000, help="training images (a fixed random subset)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images (a fixed random subset)")
    parser.add_argument("--epochs", type=int, default=4, help="baseline training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--finetune-lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        for seed in (int(text) for text in args.seeds.split(",")):
            name = f"seed{seed}_scratch.json" if args.scratch else f"seed{seed}.json"
            (out / name).write_text(json.dumps(run_seed(args, seed), indent=2) + "\n")
    results = summarise(out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
