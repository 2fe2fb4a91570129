"""`gex eval`: evaluate a checkpoint on its dataset's validation/test split (single centre crop):
top-1/top-5 error (%), params and MACs, written as JSON."""

from __future__ import annotations

import argparse
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..engine import evaluate, evaluation_trainer, load_for_evaluation
from ..errors import DataNotFoundError, GexError, one_line
from ._evaluation import add_evaluation_arguments, checked_output_path, data_overrides, write_result

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gex eval", description=__doc__)  # the module's docstring
    add_evaluation_arguments(
        parser,
        checkpoint_help="a .ckpt written by gex train or gex compare",
        batch_size_help="global evaluation batch size",
        subset_help="evaluate on a fixed random subset of this size",
    )
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed (default: float32)")
    return parser


_DATA_HINT = " [gex eval: pass --data-root with the folder of the checkpoint's dataset]"


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the errors and write the JSON file."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        # The output is checked before the evaluation, which can take hours on ImageNet.
        out = checked_output_path(args)
        module, datamodule = load_for_evaluation(args.checkpoint, data=data_overrides(args))
        trainer = evaluation_trainer(args.accelerator, precision=args.precision)
        result = evaluate(module, datamodule, trainer=trainer, checkpoint=str(args.checkpoint))
        out = write_result(result, out, overwrite=args.overwrite, command="gex eval")
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
