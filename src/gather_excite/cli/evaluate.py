"""``gex eval``: single-centre-crop top-1/top-5 error of a checkpoint, with params and MACs, written to JSON."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..engine import evaluate, load_for_evaluation, write_eval_json
from ..errors import ConfigError, DataNotFoundError, GexError, one_line

__all__ = ["check_output_file", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gex eval",
        description="Evaluate a checkpoint on its dataset's validation/test split (single centre crop): "
        "top-1/top-5 error (%), params and MACs, written as JSON.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by gex train or gex compare")
    parser.add_argument("--out", default=None, help="JSON file to write (default: eval.json beside the checkpoint)")
    parser.add_argument("--data-root", default=None, help="data folder (default: the one the model was trained on)")
    parser.add_argument("--batch-size", type=int, default=None, help="global evaluation batch size")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader processes")
    parser.add_argument("--subset", type=int, default=None, help="evaluate on a fixed random subset of this size")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default)")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed (default: float32)")
    return parser


def check_output_file(path: Path, flag: str = "--out") -> None:
    """Raise :class:`ConfigError` unless ``path`` can become a file: not a folder, its parent a folder or creatable."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; expected the path of a JSON file to write")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so no folder can hold {path.name}")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the folder {parent} is not writable")


_DATA_HINT = " [gex eval: pass --data-root with the folder of the checkpoint's dataset]"


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the errors and write the JSON file."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides: dict[str, object] = {}
    if args.data_root is not None:
        overrides["root"] = args.data_root
    if args.batch_size is not None:
        overrides["eval_batch_size"] = args.batch_size
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    if args.subset is not None:
        overrides["val_subset"] = args.subset
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval.json"
    try:
        # The output is checked before the evaluation, which can take hours on ImageNet.
        check_output_file(out)
        module, datamodule = load_for_evaluation(args.checkpoint, data=overrides)
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        result = evaluate(module, datamodule, trainer=trainer, checkpoint=str(args.checkpoint))
        write_eval_json(result, out)
    # MisconfigurationException: Lightning's type for a setting it cannot honour (--accelerator gpu without one).
    except (GexError, MisconfigurationException) as err:
        hint = _DATA_HINT if isinstance(err, DataNotFoundError) else ""
        print(f"gex eval: error: {one_line(err)}{hint}", file=sys.stderr)
        return 2
    print(
        f"{result['model']}: top-1 error {result['top1_err']:.2f}%  top-5 error {result['top5_err']:.2f}%  "
        f"params {result['params'] / 1e6:.3f} M  MACs {result['macs'] / 1e6:.1f} M  ({result['num_images']} images) "
        f"-> {out}"
    )
    return 0
