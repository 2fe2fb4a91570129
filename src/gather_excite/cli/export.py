"""``gex export``: write a trained model in a format other tools load; one function per ``--format``.

``safetensors`` writes a folder (``model.safetensors``, ``config.json``, a Hub model card) that
``create_model(name, pretrained=FOLDER)`` loads and ``--push-to-hub ORG/REPO`` uploads.
``onnx`` (the dynamo exporter) and ``pt2`` (``torch.export``) write the network's graph, from a
checkpoint or a registered model name, with ``--dynamic`` batch/height/width, then run the file
against eager PyTorch (onnxruntime for ONNX) and print the largest difference per input size.
Every output is written whole or not at all: the graph file is written and checked under a
temporary name beside ``--out`` and renamed onto it only then; the safetensors folder is built
beside ``--out`` and swapped in whole (an earlier export there is replaced, never mixed with).
A new format is one more entry in :data:`EXPORTERS`: a function ``(args) -> str`` (the line to
print) and, if it needs options, an ``add_<format>_arguments(parser)`` call in :func:`_parser`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, GexError, one_line
from ..serialization import load_json_file
from ._args import int_at_least
from ._outputs import add_overwrite_argument, check_not_an_input, check_output_file, check_output_folder

if TYPE_CHECKING:
    from torch import nn

__all__ = ["EXPORTERS", "main"]


def _names(recorded: object, checkpoint: Path) -> bool:
    """Whether an evaluation's ``"checkpoint"`` entry is ``checkpoint``: the same file name in a folder of
    the same name (``checkpoints/best.ckpt`` is not ``checkpoints/last.ckpt``). Only the tail is compared:
    the entry may be relative to where ``gex eval`` ran, or name the run folder before it was moved."""
    if not isinstance(recorded, str) or not recorded:
        return False
    tail = Path(os.path.normpath(recorded)).parts[-2:]
    return any(full.parts[-len(tail) :] == tail for full in (checkpoint.absolute(), checkpoint.resolve()))


def _eval_figures(args: argparse.Namespace) -> dict[str, object]:
    """The figures of ``--eval-json``, else of the newest ``gex eval`` output beside the checkpoint
    (``eval.json``, ``eval-2.json``, ...) or ``gex train``'s ``eval.json`` in its run folder that evaluated
    this checkpoint as it is now (written after it). Another checkpoint's figures are never put on the card."""
    checkpoint = Path(args.checkpoint).expanduser()
    if args.eval_json:
        path = Path(args.eval_json)
        if not path.is_file():
            raise ConfigError(f"--eval-json {args.eval_json!r}: no such file")
        figures = _read_figures(path, "--eval-json")
        if "checkpoint" in figures and not _names(figures["checkpoint"], checkpoint):
            raise ConfigError(
                f"--eval-json {args.eval_json!r} evaluated {figures['checkpoint']!r}, not {args.checkpoint!r}: "
                "its figures would be published as this checkpoint's"
            )
        return figures
    if not checkpoint.is_file():
        return {}
    folder = checkpoint.absolute().parent
    candidates = [*folder.glob("eval*.json"), folder.parent / "eval.json"]
    written = checkpoint.stat().st_mtime
    found = [
        (path.stat().st_mtime, figures)
        for path in candidates
        if re.fullmatch(r"eval(-\d+)?\.json", path.name) and path.is_file() and path.stat().st_mtime >= written
        and _names((figures := _read_figures(path)).get("checkpoint"), checkpoint)
    ]  # fmt: skip
    return max(found, key=lambda entry: entry[0])[1] if found else {}


def _read_figures(path: Path, what: str = "evaluation") -> dict[str, object]:
    figures = load_json_file(path, f"{what} {str(path)!r}")
    if not isinstance(figures, dict):
        raise ConfigError(f"{what} {str(path)!r}: expected a JSON object (gex eval's output)")
    return figures


def _export_safetensors(args: argparse.Namespace) -> str:
    from ..hub import check_export_folder, export_pretrained, push_to_hub

    if args.out is None:
        raise ConfigError("--out is required: the folder to write model.safetensors, config.json and README.md into")
    check_not_an_input(args.out, [("checkpoint", args.checkpoint), ("--eval-json", args.eval_json)])
    check_output_folder(args.out, overwrite=args.overwrite, replaced_whole=True)
    check_export_folder(args.out, "--out")
    out = export_pretrained(args.checkpoint, args.out, eval_results=_eval_figures(args), repo_id=args.push_to_hub)
    message = (
        f"wrote {out}/model.safetensors, config.json, README.md (load: create_model(..., pretrained={str(out)!r}))"
    )
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except OSError as err:
            raise OSError(f"{one_line(err)}; {out} was written: add --overwrite to write it and upload again") from None
        message += f"\npushed to {url} (load: pretrained='hf-hub:{args.push_to_hub}')"
    return message


def _network(args: argparse.Namespace) -> nn.Module:
    """The eval-mode network of a checkpoint or of a registered model name (fresh weights)."""
    from ..engine.loading import load_model
    from ..export import min_input_size

    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.dynamic and args.batch_size is not None:
        raise ConfigError("--batch-size fixes the batch of a static graph; with --dynamic the batch is symbolic")
    if args.out is None:
        raise ConfigError(f"--out is required: the file to write the {args.format} graph into")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: the folder {str(out.parent)!r} does not exist")
    check_output_file(out, overwrite=args.overwrite)
    check_not_an_input(out, [("checkpoint", args.checkpoint)])
    kwargs: dict[str, object] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.image_size is not None:
        kwargs["input_size"] = args.image_size
    try:
        model = load_model(args.checkpoint, **kwargs).net.eval()
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, GexError):
            raise
        raise ConfigError(str(err)) from None
    floor = min_input_size(model)
    if args.dynamic and min(model.input_size) < floor:
        size = "x".join(map(str, model.input_size))
        raise ConfigError(
            f"--image-size {size}: with --dynamic the height and width must be >= {floor} (one pixel above the "
            "network's total stride, so that its deepest map is at least 2x2)"
        )
    return model


def _report(args: argparse.Namespace, differences: dict[str, float] | None) -> str:
    shapes = "dynamic shapes" if args.dynamic else f"static shapes, batch {args.batch_size or 1}"
    lines = [f"wrote {args.out} ({args.format}, {shapes})"]
    lines += [f"  {size}: max |exported - eager| = {value:.3g}" for size, value in (differences or {}).items()]
    return "\n".join(lines)


def _checks(model: nn.Module, args: argparse.Namespace) -> dict[str, object]:
    """The sizes and batch the exported graph is run at against eager: three sizes and two images for a
    dynamic graph, the fixed size and batch (``--batch-size``, default 1) of a static one."""
    from ..export import check_sizes

    if args.dynamic:
        return {"sizes": check_sizes(model), "batch": 2}
    return {"sizes": [tuple(model.input_size)], "batch": args.batch_size or 1}


def _example(model: nn.Module, args: argparse.Namespace):
    from ..export import example_input

    return example_input(model, batch=_checks(model, args)["batch"])


def _export_pt2(args: argparse.Namespace) -> str:
    """A ``torch.export`` program (``torch.export.save``), loaded back and run against eager, then renamed
    onto ``--out`` (an earlier file there stays until the new one is complete and checked)."""
    import torch

    from .._atomic import atomic_path
    from ..export import export_program, max_difference

    model = _network(args)
    program = export_program(model, example=_example(model, args), dynamic=args.dynamic)
    with atomic_path(args.out) as temporary:
        torch.export.save(program, temporary)
        differences = max_difference(torch.export.load(temporary).module(), model, **_checks(model, args))
    return _report(args, differences)


def _export_onnx(args: argparse.Namespace) -> str:
    """An ONNX file (dynamo exporter), run by onnxruntime against eager when onnxruntime is installed, then
    renamed onto ``--out`` (ONNX's ``save`` takes a file name only: it writes under a temporary one)."""
    if find_spec("onnxscript") is None or find_spec("onnx") is None:
        raise ConfigError("--format onnx needs the onnx and onnxscript packages: pip install 'gather-excite[export]'")
    from .._atomic import atomic_path
    from ..export import export_onnx, onnx_max_difference

    model = _network(args)
    with atomic_path(args.out) as temporary:
        export_onnx(model, temporary, example=_example(model, args), dynamic=args.dynamic)
        if find_spec("onnxruntime") is None:
            differences = None
        else:
            differences = onnx_max_difference(temporary, model, **_checks(model, args))
    if differences is None:
        return _report(args, None) + "\n  onnxruntime is not installed: the file was not checked against eager"
    return _report(args, differences)


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected an int or HxW of ints >= 1 (e.g. 224 or 256x192), got {text!r}")
    return (values[0], values[-1])


# format -> exporter; each returns the line(s) to print and raises a GexError on bad input.
EXPORTERS: dict[str, Callable[[argparse.Namespace], str]] = {
    "safetensors": _export_safetensors,
    "onnx": _export_onnx,
    "pt2": _export_pt2,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gex export",
        description="Export a checkpoint. safetensors: a folder with model.safetensors, config.json (architecture, "
        "constructor arguments, input size, mean/std, class names, eval figures) and a Hub model card. onnx, pt2: "
        "the network's graph (also of a model name), checked against eager PyTorch at three input sizes.",
    )
    parser.add_argument(
        "checkpoint", metavar="CKPT_OR_NAME",
        help="a .ckpt written by gex train / gex compare (onnx and pt2 also take a registered model name)",
    )  # fmt: skip
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="what to write")
    parser.add_argument("--out", default=None, help="where to write it (a folder for safetensors, a file otherwise)")
    add_overwrite_argument(parser)
    hub = parser.add_argument_group("safetensors")
    hub.add_argument(
        "--eval-json",
        default=None,
        help="figures for the card (default: the newest eval.json/eval-N.json of this checkpoint beside it, "
        "or its run's eval.json)",
    )
    hub.add_argument("--push-to-hub", default=None, metavar="ORG/REPO", help="upload the folder (needs network)")
    hub.add_argument("--private", action="store_true", help="create the Hub repository as private")
    graph = parser.add_argument_group("onnx, pt2")
    graph.add_argument(
        "--dynamic", action="store_true",
        help="symbolic batch, height and width (default: fixed to --batch-size and the model's input size)",
    )  # fmt: skip
    graph.add_argument(
        "--batch-size", type=int_at_least(1), default=None, help="the batch of a static graph (default 1)"
    )
    graph.add_argument("--num-classes", type=int, default=None, help="classes of a model name (default 1000)")
    graph.add_argument(
        "--image-size", type=_image_size, default=None,
        help="input size of a model name, N or HxW (default 224 ImageNet, 32 CIFAR; a checkpoint keeps its own)",
    )  # fmt: skip
    return parser


# option -> the formats it applies to; given with another format it would be silently ignored.
_FORMAT_OPTIONS = {
    "--eval-json": ("safetensors",),
    "--push-to-hub": ("safetensors",),
    "--private": ("safetensors",),
    "--dynamic": ("onnx", "pt2"),
    "--num-classes": ("onnx", "pt2"),
    "--image-size": ("onnx", "pt2"),
    "--batch-size": ("onnx", "pt2"),
}


def _check_format_options(args: argparse.Namespace) -> None:
    for option, formats in _FORMAT_OPTIONS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value not in (None, False) and args.format not in formats:
            raise ConfigError(f"{option} applies to --format {' and '.join(formats)}, not {args.format}")


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the chosen format's exporter."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _check_format_options(args)
        print(EXPORTERS[args.format](args))
    except (GexError, OSError) as err:  # OSError: a download or upload that cannot reach its server
        print(f"gex export: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0
