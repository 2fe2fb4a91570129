"""Argument types shared by the ``gex`` commands: a bad value is argparse's one-line usage error."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["ACCELERATORS", "add_accelerator_argument", "int_at_least"]

# The devices gex eval, gex detect eval and gex analyze run on (Lightning's accelerator names).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an int ``>= minimum`` (``--batch-size 0`` is refused, not read as "unset")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type in its errors
    return parse


def add_accelerator_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--accelerator {auto,cpu,gpu,cuda,mps}`` (default ``auto``), the same option in every command that takes it."""
    parser.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="device (default %(default)s)")
