"""``gex detect``: Faster R-CNN on a GE backbone: ``train`` (YAML recipe, Lightning), ``eval`` (COCO AP), ``data``.

``gex detect train`` is ``gex train`` for detectors: the same recipe format and overrides,
``--out``/``--resume``, checkpoints, TensorBoard/CSV logs, DDP and the final ``eval.json``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..errors import CheckpointError, CheckpointNotFoundError, GexError, one_line
from ._evaluation import add_evaluation_arguments, checked_output_path, data_overrides, write_result
from ._outputs import add_overwrite_argument, check_output_folder

__all__ = ["main"]

_USAGE = """usage: gex detect <train|eval|data> [options]

  train  train a detector from a YAML recipe (configs/detection/NAME.yaml: --config NAME), then write OUT/eval.json
  eval   COCO AP/AR (pycocotools), per-class AP, params and MACs of a detector checkpoint, as JSON
  data   write the Fashion-MNIST canvas detection set (COCO folders) used by the small recipe

Run `gex detect <command> --help` for its options."""

# The project's input errors, Lightning's for a Trainer setting it cannot honour, and
# jsonargparse's for a recipe value of the wrong type or outside its choices.
_ERRORS = (GexError, MisconfigurationException, ArgumentError)


def _fail(command: str, err: BaseException) -> int:
    print(f"gex detect {command}: error: {one_line(err)}", file=sys.stderr)
    return 2


def recipe_dir() -> Path:
    """The folder of the packaged detection recipes (``gather_excite/configs/detection``)."""
    return Path(__file__).resolve().parent.parent / "configs" / "detection"


def _resolve_recipes(argv: list[str]) -> list[str]:
    """``--config NAME`` -> the packaged ``configs/detection/NAME.yaml`` when NAME is not a file."""
    resolved = list(argv)
    for index, arg in enumerate(resolved[:-1]):
        if arg in ("-c", "--config") and not Path(resolved[index + 1]).expanduser().is_file():
            packaged = recipe_dir() / f"{resolved[index + 1].removesuffix('.yaml')}.yaml"
            if packaged.is_file():
                resolved[index + 1] = str(packaged)
    return resolved


def _ap(value: float | None) -> str:
    """An AP for the summary line; ``None`` where COCOeval has nothing to average (no ground truth boxes)."""
    return "n/a (no ground-truth boxes)" if value is None else f"{value:.3f}"


def _train(argv: list[str]) -> int:
    """Parse the recipe and overrides, train, then evaluate the final weights into OUT/eval.json."""
    from lightning.pytorch.cli import LightningArgumentParser

    from ..detection import CocoDetectionData, DetectionModule
    from .train import GexCLI, _parse, run_held

    class DetectCLI(GexCLI):
        # Detection recipes validate every few epochs: last.ckpt still follows every epoch.
        monitor, monitor_mode, last_on_train_epoch_end = "val/AP", "max", True

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            super().add_arguments_to_parser(parser)
            # One resize setting (the data's) for the training transform and the detector,
            # and the category map read from the training JSON into the model (and checkpoint).
            parser.link_arguments("data.min_size", "model.min_size")
            parser.link_arguments("data.max_size", "model.max_size")
            parser.link_arguments("data.categories", "model.categories", apply_on="instantiate")

    argv = _resolve_recipes(argv)
    try:
        cli = _parse(
            argv,
            cli_class=DetectCLI,
            model_class=DetectionModule,
            data_class=CocoDetectionData,
            prog="gex detect train",
            description="Train a Faster R-CNN detector on a GE backbone from a YAML recipe (--config NAME: "
            "configs/detection/NAME.yaml), then evaluate it (COCO AP) into OUT/eval.json.",
        )
        return run_held(cli, "gex detect train", _fit_and_evaluate)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except _ERRORS as err:
        return _fail("train", err)


def _fit_and_evaluate(cli: Any, out: Path) -> int:
    """``gex detect train``'s run: fit, then evaluate into ``out/eval.json`` (``_train`` reports what goes wrong)."""
    from ..detection import evaluate_detector
    from ..engine import TrainSpeed, write_eval_json
    from .train import _resume_path, finished_before, saved_last

    ckpt_path = _resume_path(cli.config["resume"], out)
    resumed_step = _check_resumable(ckpt_path, cli.model) if ckpt_path is not None else None
    cpu_start = time.process_time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    cpu_seconds = time.process_time() - cpu_start
    if finished_before(cli, out, resumed_step, "gex detect train"):
        pass
    elif cli.config["eval_after"] and not cli.trainer.interrupted:
        # Every process evaluates its share; the predictions are gathered, rank 0 writes the file.
        result = evaluate_detector(cli.model, cli.datamodule, trainer=cli.trainer, checkpoint=saved_last(out))
        speed = next((c for c in cli.trainer.callbacks if isinstance(c, TrainSpeed)), None)
        if cli.trainer.is_global_zero:
            result["train"] = {
                "seed": cli.config.get("seed_everything"),
                "max_epochs": cli.trainer.max_epochs,
                "steps": cli.trainer.global_step,
                # this process only: its share of the batch, its threads' CPU time
                "images_per_s": speed.images_per_second if speed is not None else None,
                "cpu_s": cpu_seconds,
            }
            path = write_eval_json(result, out / "eval.json")
            print(f"AP {_ap(result['AP'])}  AP50 {_ap(result['AP50'])}  -> {path}")
    return 0


def _check_resumable(path: str, model: Any) -> int:
    """Read the checkpoint now (weights-only, as ``gex train`` does) so that an empty, truncated or foreign
    file, another detector's, or one without the optimizer and loop state fails in one line before any work;
    returns the training step it was saved at.

    The classifier's reader (``engine.read_checkpoint``) refuses detector checkpoints, so the file is read
    with the reader beneath it (:func:`~gather_excite.serialization.load_torch_file`) and checked by the
    module (:meth:`DetectionModule.check_checkpoint`: a detector's, of this architecture)."""
    from ..errors import UnsafeFileError
    from ..serialization import load_torch_file
    from .train import require_training_state

    try:
        saved = load_torch_file(path, f"checkpoint {path!r}", mmap=True)
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path!r} holds a {type(saved).__name__}, not a Lightning checkpoint")
        model.check_checkpoint(saved)
    except (CheckpointError, UnsafeFileError) as err:
        raise type(err)(f"--resume {path}: {one_line(err)}") from None
    require_training_state(saved, path, "saved with save_weights_only")
    return int(saved.get("global_step", -1))


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gex detect eval",
        description="COCO bounding-box AP/AR (pycocotools), per-class AP, params and MACs of a detector "
        "checkpoint on its validation split, written as JSON.",
    )
    add_evaluation_arguments(
        parser,
        checkpoint_help="a .ckpt written by gex detect train",
        batch_size_help="evaluation batch size",
        subset_help="evaluate on the first N validation images",
    )
    parser.add_argument(
        "--invalid-boxes", choices=("refuse", "drop"), default=None,
        help="a degenerate or out-of-image ground-truth box: refuse the data, or accept it (drop: left out of "
        "training; COCOeval scores against the JSON as given). Default: the checkpoint's own data setting",
    )  # fmt: skip
    return parser


def load_detector(checkpoint: str | Path, data: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The :class:`DetectionModule` of ``checkpoint`` (eval mode) and its datamodule; refuses a classifier's."""
    from ..detection import CocoDetectionData, DetectionModule, is_detector_checkpoint
    from ..serialization import load_torch_file

    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    saved = load_torch_file(path, f"checkpoint {str(path)!r}", mmap=True)
    if not isinstance(saved, dict) or not is_detector_checkpoint(saved):
        kind = (
            "a classifier checkpoint (gex train; evaluate it with gex eval)"
            if isinstance(saved, dict) and "arch" in (saved.get("hyper_parameters") or {})
            else "not a Lightning detector checkpoint"
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} is {kind}; gex detect eval expects a gex detect train checkpoint"
        )
    # Only the module's own arguments are read (a class path saved beside them is never imported);
    # backbone_init was read when the run started, the checkpoint holds the trained weights.
    accepted = set(inspect.signature(DetectionModule.__init__).parameters) - {"self"}
    hparams = {key: value for key, value in saved["hyper_parameters"].items() if key in accepted}
    module = DetectionModule(**{**hparams, "backbone_init": None})
    try:
        module.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its weights do not fit its detector: {one_line(err)[:300]}"
        ) from None
    arguments = dict(saved.get(CocoDetectionData.CHECKPOINT_HYPER_PARAMS_KEY) or {})
    accepted = set(inspect.signature(CocoDetectionData.__init__).parameters) - {"self"}
    arguments = {key: value for key, value in arguments.items() if key in accepted}
    arguments.update(data or {})
    datamodule = CocoDetectionData(**arguments)
    datamodule.categories = module.hparams["categories"]  # the checkpoint's map, not the training JSON's
    return module.eval(), datamodule


def _eval(argv: list[str]) -> int:
    from ..detection import evaluate_detector
    from ..engine import evaluation_trainer

    args = _eval_parser().parse_args(argv)
    try:
        out = checked_output_path(args)  # as gex eval: before the evaluation, not after it
        data = data_overrides(args)
        if args.invalid_boxes is not None:
            data["invalid_boxes"] = args.invalid_boxes
        module, datamodule = load_detector(args.checkpoint, data)
        trainer = evaluation_trainer(args.accelerator)
        result = evaluate_detector(module, datamodule, trainer=trainer, checkpoint=str(args.checkpoint))
    except _ERRORS as err:
        return _fail("eval", err)
    out = write_result(result, out, overwrite=args.overwrite, command="gex detect eval")
    print(
        f"{result['model']} ({result['layout']}): AP {_ap(result['AP'])}  AP50 {_ap(result['AP50'])}  "
        f"params {result['params'] / 1e6:.3f} M  MACs {result['macs'] / 1e9:.2f} G at {result['eval_size']}  "
        f"({result['num_images']} images) -> {out}"
    )
    return 0


def _data_parser() -> argparse.ArgumentParser:
    from ..data.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT
    from ..detection import CanvasSpec

    spec = CanvasSpec()
    parser = argparse.ArgumentParser(
        prog="gex detect data",
        description="Paste real Fashion-MNIST images onto blank canvases and write a COCO-format detection set "
        "(train: Fashion-MNIST's training images, val: its test images). Deterministic for a seed.",
    )
    parser.add_argument("--out", required=True, help="folder to write train/, val/ and annotations/ into")
    parser.add_argument(
        "--data-root", default=DEFAULT_FASHION_MNIST_ROOT, help="Fashion-MNIST IDX files (default %(default)s)"
    )
    parser.add_argument("--download", action="store_true", help="fetch Fashion-MNIST into --data-root if missing")
    default = " (default %(default)s)"  # CanvasSpec's
    parser.add_argument("--canvas-size", type=int, default=spec.canvas_size, help="canvas side in pixels" + default)
    parser.add_argument("--train-count", type=int, default=spec.train_count, help="training canvases" + default)
    parser.add_argument("--val-count", type=int, default=spec.val_count, help="validation canvases" + default)
    parser.add_argument("--min-items", type=int, default=spec.min_items, help="fewest items a canvas" + default)
    parser.add_argument("--max-items", type=int, default=spec.max_items, help="most items a canvas" + default)
    parser.add_argument(
        "--min-scale", type=float, default=spec.min_scale, help="smallest item scale, x 28 px" + default
    )
    parser.add_argument("--max-scale", type=float, default=spec.max_scale, help="largest item scale, x 28 px" + default)
    parser.add_argument(
        "--max-overlap",
        type=float,
        default=spec.max_overlap,
        help="largest intersection of two items' boxes over the smaller box" + default,
    )
    parser.add_argument("--seed", type=int, default=spec.seed, help="random seed" + default)
    add_overwrite_argument(parser)
    return parser


def _data(argv: list[str]) -> int:
    from ..detection import CanvasSpec, make_fashion_mnist_detection

    args = _data_parser().parse_args(argv)
    try:
        check_output_folder(args.out, overwrite=args.overwrite)
        # Each CanvasSpec field is the option of the same name (_data_parser takes its defaults from the spec).
        spec = CanvasSpec(**{field.name: getattr(args, field.name) for field in fields(CanvasSpec)})
        paths = make_fashion_mnist_detection(args.out, spec, root=args.data_root, download=args.download)
    except _ERRORS as err:
        return _fail("data", err)
    print(
        f"wrote {spec.train_count} training and {spec.val_count} validation canvases: "
        f"{paths['train_annotations']}, {paths['val_annotations']}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``gex detect train|eval|data``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "eval": _eval, "data": _data}
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    if argv[0] not in commands:
        print(f"gex detect: unknown command {argv[0]!r} (expected train, eval or data)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
