"""What ``gex eval`` and ``gex detect eval`` share: their options, the data settings those override, the output file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_evaluation_arguments", "check_output_file", "data_overrides", "output_path"]

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
    parser.add_argument("--out", default=None, help="JSON file to write (default: eval.json beside the checkpoint)")
    parser.add_argument("--data-root", default=None, help="data folder (default: the one the model was trained on)")
    parser.add_argument("--batch-size", type=int, default=None, help=batch_size_help)
    parser.add_argument("--num-workers", type=int, default=None, help="data loader processes")
    parser.add_argument("--subset", type=int, default=None, help=subset_help)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default)")


def data_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The datamodule arguments that the options set (``--batch-size`` -> ``eval_batch_size``, ...)."""
    return {key: getattr(args, dest) for dest, key in _DATA_OPTIONS.items() if getattr(args, dest) is not None}


def output_path(args: argparse.Namespace) -> Path:
    """``--out``, or ``eval.json`` in the checkpoint's folder."""
    return Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval.json"


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
