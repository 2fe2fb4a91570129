"""What ``gex eval`` and ``gex detect eval`` share: their options, the data settings those override, the output file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._args import add_accelerator_argument, int_at_least
from ._outputs import add_overwrite_argument, check_not_an_input, check_output_file, next_free_path

__all__ = ["add_evaluation_arguments", "checked_output_path", "data_overrides", "write_result"]

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
    add_accelerator_argument(parser)


def data_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The datamodule arguments that the options set (``--batch-size`` -> ``eval_batch_size``, ...)."""
    return {key: getattr(args, dest) for dest, key in _DATA_OPTIONS.items() if getattr(args, dest) is not None}


def checked_output_path(args: argparse.Namespace) -> Path:
    """``--out`` (refused where a file is, unless ``--overwrite``), or the first free ``eval.json``,
    ``eval-2.json``, ... in the checkpoint's folder (where earlier evaluations of it are)."""
    out = Path(args.out) if args.out else next_free_path(Path(args.checkpoint).resolve().parent / "eval.json")
    check_output_file(out, overwrite=args.overwrite, kind="JSON file")
    check_not_an_input(out, [("checkpoint", args.checkpoint)])
    return out


def write_result(result: dict[str, Any], out: Path, *, overwrite: bool, command: str) -> Path:
    """Write the evaluation JSON to ``out``, claiming the name only now: the evaluation may have taken
    hours, and another command may have written ``out`` meanwhile. With ``--overwrite`` it is replaced;
    otherwise this result goes to the next free name beside it (``eval-2.json``), so neither is lost."""
    from ..engine import write_eval_json

    if overwrite:
        return write_eval_json(result, out)
    while True:
        try:
            return write_eval_json(result, out, exclusive=True)
        except FileExistsError:
            taken, out = out, next_free_path(out)
            print(f"{command}: {taken} was written by another command during the evaluation; "
                  f"this one goes to {out}", file=sys.stderr)  # fmt: skip
