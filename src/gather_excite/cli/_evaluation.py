"""What ``gex eval`` and ``gex detect eval`` share: their options, the data settings those override, the output file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import int_at_least
from ._outputs import add_overwrite_argument, check_output_file, next_free_path

__all__ = ["add_evaluation_arguments", "checked_output_path", "data_overrides"]

# option dest -> the datamodule argument it overrides; an option left out keeps the checkpoint's value.
_DATA_OPTIONS = {
    "data_root": "root",
    "batch_size": "eval_batch_size",
    "num_workers": "num_workers",
    "subset": "val_subset",
}


def add_evaluation_arguments(
    parser: argparse.ArgumentParser, *, checkpoint_help: str, batch_size_help: str, subset_help: str
) -> None:
    """The checkpoint, ``--out``, the data overrides (``--data-root`` ... ``--subset``) and ``--accelerator``."""
    parser.add_argument("checkpoint", help=checkpoint_help)
    parser.add_argument("--out", default=None, help="JSON file to write (default: eval.json beside the checkpoint, "
                        "or eval-2.json ... where that exists)")  # fmt: skip
    add_overwrite_argument(parser)
    parser.add_argument("--data-root", default=None, help="data folder (default: the one the model was trained on)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None, help=batch_size_help)
    parser.add_argument("--num-workers", type=int_at_least(0), default=None, help="data loader processes")
    parser.add_argument("--subset", type=int_at_least(1), default=None, help=subset_help)
    parser.add_argument(
        "--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda", "mps"), help="device (default auto)"
    )


def data_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The datamodule arguments that the options set (``--batch-size`` -> ``eval_batch_size``, ...)."""
    return {key: getattr(args, dest) for dest, key in _DATA_OPTIONS.items() if getattr(args, dest) is not None}


def checked_output_path(args: argparse.Namespace) -> Path:
    """``--out`` (refused where a file is, unless ``--overwrite``), or the first free ``eval.json``,
    ``eval-2.json``, ... in the checkpoint's folder (where earlier evaluations of it are)."""
    out = Path(args.out) if args.out else next_free_path(Path(args.checkpoint).resolve().parent / "eval.json")
    check_output_file(out, overwrite=args.overwrite, kind="JSON file")
    return out
