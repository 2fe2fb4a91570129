"""``gex analyze``: the paper's Section 4 analyses of trained checkpoints, as ``<name>.png`` + ``<name>.json``.

    gex analyze selectivity BASE.ckpt GE.ckpt --labels ResNet-50 GE-θ   # Figure 3
    gex analyze prune GE.ckpt --baseline BASE.ckpt --units conv5_1     # Figure 5
    gex analyze curves runs/base runs/ge                              # Figure 4
    gex analyze curves runs/ge_e2 runs/ge_e4 runs/ge_e8 runs/ge --extent   # Figure 2
    gex analyze plot out/prune.json                                  # re-draw a figure from its JSON

Models and data load as ``gex eval`` loads them: the checkpoint rebuilds the network and the
datamodule it was trained with, whose validation split (single centre crop) is analysed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..errors import ConfigError, DataError, DataNotFoundError, GexError, one_line
from ._args import add_accelerator_argument, int_at_least
from ._evaluation import data_overrides
from ._outputs import add_overwrite_argument, check_not_an_input, check_output_file

__all__ = ["main"]

SUBCOMMANDS = ("selectivity", "prune", "curves", "plot")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (as gex eval)")
    group.add_argument("--data-root", default=None, help="data folder (default: the one the model was trained on)")
    group.add_argument("--batch-size", type=int_at_least(1), default=None, help="evaluation batch size")
    group.add_argument("--num-workers", type=int_at_least(0), default=None, help="data loader processes")
    group.add_argument(
        "--subset", type=int_at_least(1), default=None, help="analyse a fixed random subset of this many images"
    )
    add_accelerator_argument(group)


def _add_output_flags(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default="analysis", help="output folder (default ./analysis)")
    parser.add_argument("--name", default=name, help=f"file stem of the PNG and JSON (default {name})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overwrite_argument(parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gex analyze",
        description="The paper's Section 4 analyses; each writes <name>.png and <name>.json to --out.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")

    selectivity = commands.add_parser(
        "selectivity", help="class selectivity histograms of a stage's units, models overlaid (Figure 3)"
    )
    selectivity.add_argument("checkpoints", nargs="+", help="one or more .ckpt files (the first one's data is used)")
    selectivity.add_argument("--labels", nargs="+", default=None, help="legend label per checkpoint")
    selectivity.add_argument(
        "--stage",
        default=None,
        help="stage label or the module path of a stage of residual units "
        "(default: the penultimate stage, conv4_x for ImageNet ResNets as in the paper)",
    )
    _add_data_flags(selectivity)
    _add_output_flags(selectivity, "selectivity")

    prune = commands.add_parser("prune", help="accuracy against gate-ranked prune ratio, asc./des. (Figure 5)")
    prune.add_argument("checkpoint", help="a GE or SE model's .ckpt")
    prune.add_argument("--baseline", default=None, help="a baseline .ckpt: its ratio 0 and 1 points (black stars)")
    prune.add_argument("--label", default=None, help="legend label of the model (default: its registry name)")
    prune.add_argument("--baseline-label", default=None, help="legend label of the baseline")
    prune.add_argument(
        "--units",
        nargs="+",
        default=None,
        help="units by paper label (conv5_1, stage3_2) or module path "
        "(default: the first gated unit of each of the last 3 stages that have one)",
    )
    prune.add_argument("--steps", type=int, default=10, help="ratios 0, 1/steps, ..., 1 (default 10)")
    prune.add_argument("--ratios", type=float, nargs="+", default=None, help="explicit prune ratios in [0, 1]")
    _add_data_flags(prune)
    _add_output_flags(prune, "prune")

    curves = commands.add_parser(
        "curves", help="train/val top-1 error per epoch (Figure 4) or error against extent ratio (Figure 2)"
    )
    curves.add_argument("runs", nargs="+", help="gex train --out folders (or metrics.csv; results.json with --extent)")
    curves.add_argument("--labels", nargs="+", default=None, help="legend label per run")
    curves.add_argument("--extent", action="store_true", help="final error against extent ratio, a panel per variant")
    _add_output_flags(curves, "curves")

    plot = commands.add_parser("plot", help="re-draw a figure from a JSON report that gex analyze wrote")
    plot.add_argument("report", help="a <name>.json written by gex analyze")
    plot.add_argument(
        "--png", default=None, help="PNG file (.png) to write (default: beside the JSON, replacing its drawing)"
    )
    add_overwrite_argument(plot)
    return parser


def _device(accelerator: str) -> torch.device:
    """The device of ``--accelerator`` (gex eval's names): ``gpu`` and ``cuda`` a CUDA GPU, ``mps`` Apple's
    GPU, ``auto`` a CUDA GPU where there is one, else the CPU."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {accelerator}: no CUDA device is available")
    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--accelerator mps: no MPS device is available")
        return torch.device("mps")
    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_gpu else "cpu")


def _load(checkpoint: str, args: argparse.Namespace):
    """The checkpoint's module and its datamodule's validation loader, as gex eval loads them."""
    from ..engine import load_for_evaluation

    module, datamodule = load_for_evaluation(checkpoint, data=data_overrides(args))
    datamodule.setup("validate")
    data = {
        "dataset": datamodule.dataset,
        "data_root": datamodule.root,
        "split": "test" if datamodule.dataset != "imagefolder" else datamodule.val_split,
        "num_classes": datamodule.num_classes,
    }
    return module, datamodule.val_dataloader(), data


def _load_other(checkpoint: str, first: Any, num_classes: int, what: str):
    """Another checkpoint's module, which must take the first one's data: its classes and its
    (channels, height, width) (the images are the first checkpoint's; the global gathers fix the size)."""
    from ..engine import load_model

    module = load_model(checkpoint)
    if module.hparams["num_classes"] != num_classes:
        raise ConfigError(
            f"{what} {checkpoint!r} has {module.hparams['num_classes']} classes but the data has {num_classes}"
        )
    if module.image_size != first.image_size:
        raise ConfigError(
            f"{what} {checkpoint!r} takes {'x'.join(map(str, module.image_size))} (channels x height x width) "
            f"inputs but the data, the first checkpoint's, are {'x'.join(map(str, first.image_size))}"
        )
    return module


def _info(module: Any, checkpoint: str, label: str | None) -> dict[str, Any]:
    return {"label": label or module.hparams["arch"], "model": module.hparams["arch"], "checkpoint": str(checkpoint)}


def _default_stage(net: torch.nn.Module) -> str:
    stages = list(getattr(net, "stage_names", {}) or {})
    if not stages:
        raise ConfigError(f"model {type(net).__name__} exposes no stage_names; pass --stage with a module path")
    return stages[-2] if len(stages) > 1 else stages[0]


def _selectivity(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from ..analysis import class_selectivity, plot_selectivity, selectivity_report, stage_units

    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        raise ConfigError(f"--labels needs one label per checkpoint ({len(args.checkpoints)}), got {len(args.labels)}")
    device = _device(args.accelerator)
    if device.type == "mps":  # before any checkpoint is read
        raise ConfigError(
            "--accelerator mps: the selectivity statistics are summed in float64, which MPS does not support; "
            "use --accelerator cpu"
        )
    first, loader, data = _load(args.checkpoints[0], args)
    modules = [first] + [_load_other(c, first, data["num_classes"], "checkpoint") for c in args.checkpoints[1:]]
    # "is not None": --stage "" is refused as an unknown stage, not read as the default.
    stage = args.stage if args.stage is not None else _default_stage(first.net)
    results = []
    for index, (module, checkpoint) in enumerate(zip(modules, args.checkpoints, strict=True)):
        info = _info(module, checkpoint, args.labels[index] if args.labels else None)
        units = stage_units(module.net, stage)
        accumulators = class_selectivity(
            module.net,
            loader,
            units={label: unit for label, (_, unit) in units.items()},
            num_classes=data["num_classes"],
            device=device,
            progress=not args.no_progress,
            desc=f"selectivity {info['label']}",
        )
        results.append((info, {label: (units[label][0], acc) for label, acc in accumulators.items()}))
        module.cpu()
    report = selectivity_report(results, stage=stage, num_classes=data["num_classes"])
    first_unit = next(iter(results[0][1].values()))
    report["data"] = {**data, "images": first_unit[1].images}
    return report, plot_selectivity


def _has_gate(unit: torch.nn.Module) -> bool:
    from ..analysis import find_gate_probe

    try:
        find_gate_probe(unit)
    except ValueError:
        return False
    return True


def _default_units(net: torch.nn.Module) -> list[str]:
    """The first gated unit of each of the last three stages that have one (the paper's conv3_1,
    conv4_1, conv5_1 for ResNet-50). Table 1's models gate one stage only: its first unit is the
    default. A model with no gate keeps the first unit of each of its last three stages, which
    prune_curves refuses with the reason (pruning needs a GE or SE model)."""
    from ..analysis import stage_units

    stages = list(getattr(net, "stage_names", {}) or {})
    if not stages:
        raise ConfigError(f"model {type(net).__name__} exposes no stage_names; pass --units")
    gated = []
    for stage in stages:
        gated += [label for label, (_, unit) in stage_units(net, stage).items() if _has_gate(unit)][:1]
    if not gated:
        return [next(iter(stage_units(net, stage))) for stage in stages[-3:]]
    return gated[-3:]


def _prune(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from ..analysis import plot_prune, prune_curves, resolve_unit

    if args.ratios is not None:
        ratios = args.ratios
    elif args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    else:
        ratios = [step / args.steps for step in range(args.steps + 1)]
    device = _device(args.accelerator)
    module, loader, data = _load(args.checkpoint, args)
    labels = args.units if args.units is not None else _default_units(module.net)
    units = {label: resolve_unit(module.net, label) for label in labels}
    baseline = baseline_units = None
    if args.baseline is not None:
        baseline = _load_other(args.baseline, module, data["num_classes"], "--baseline")
        baseline_units = {label: resolve_unit(baseline.net, label) for label in labels}
    report = prune_curves(
        module.net,
        loader,
        units=units,
        ratios=ratios,
        device=device,
        progress=not args.no_progress,
        baseline=baseline.net if baseline is not None else None,
        baseline_units=baseline_units,
    )
    report = {
        "analysis": "prune",
        "model": _info(module, args.checkpoint, args.label),
        "baseline": _info(baseline, args.baseline, args.baseline_label) if baseline is not None else None,
        "data": {**data, "images": report["images"]},
        **{key: value for key, value in report.items() if key != "analysis"},
    }
    return report, plot_prune


def _curves(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from ..analysis import epoch_curves_report, extent_report, plot_curves

    if args.extent:
        if args.labels is not None:
            raise ConfigError("--labels applies to per-epoch curves; --extent labels each variant itself")
        return extent_report(args.runs), plot_curves
    return epoch_curves_report(args.runs, labels=args.labels), plot_curves


@contextlib.contextmanager
def _analysis_input_errors() -> Iterator[None]:
    """Report a ``ValueError`` raised by ``gather_excite.analysis`` itself as a :class:`ConfigError`.

    The analysis functions raise ``ValueError`` only to reject what the user named (runs, units,
    stages, labels, reports). A ``ValueError`` raised anywhere else is a bug and keeps its traceback.
    """
    try:
        yield
    except ValueError as err:
        if isinstance(err, GexError):
            raise
        frame = err.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        analysis = Path(__file__).resolve().parent.parent / "analysis"
        if frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(analysis):
            raise ConfigError(str(err)) from err
        raise


def _inputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The files an analysis reads, which its outputs must not replace."""
    if args.command == "selectivity":
        return [("checkpoint", path) for path in args.checkpoints]
    if args.command == "prune":
        return [("checkpoint", args.checkpoint), ("--baseline", args.baseline)]
    return [("run", path) for path in args.runs]


_DATA_HINT = " [gex analyze: pass --data-root with the folder of the checkpoint's dataset]"


def main(argv: list[str] | None = None) -> int:
    """Run one analysis and write its PNG and JSON (or re-draw a PNG from a JSON)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from ..analysis import PLOTS, load_report, save_png, write_report

    try:
        with _analysis_input_errors():
            if args.command == "plot":
                # As --name for the other commands: the file written is exactly the one named and checked.
                if args.png is not None and Path(args.png).suffix.lower() != ".png":
                    raise ConfigError(f"--png {args.png}: expected the path of a PNG file, ending in .png")
                report = load_report(args.report)
                if report["analysis"] not in PLOTS:
                    raise ConfigError(f"report analysis must be one of {sorted(PLOTS)}, got {report['analysis']!r}")
                png = Path(args.png) if args.png else Path(args.report).with_suffix(".png")
                # The PNG beside a report is that report's own drawing (write_report draws it from the JSON).
                check_output_file(png, "--png", overwrite=args.overwrite or args.png is None)
                check_not_an_input(png, [("report", args.report)], "--png")
                try:
                    figure = PLOTS[report["analysis"]](report)
                except (KeyError, TypeError, IndexError) as err:  # a report cut short or edited by hand
                    raise DataError(
                        f"report {args.report!r} is not a complete {report['analysis']} report "
                        f"({type(err).__name__}: {one_line(err)})"
                    ) from None
                save_png(figure, png)
                print(f"-> {png}")
                return 0
            # The name and the outputs are checked before the analysis, which can take hours.
            if not args.name or Path(args.name).name != args.name:
                raise ConfigError(f"--name must be a plain file stem (no folder), got {args.name!r}")
            for suffix in (".json", ".png"):
                check_output_file(Path(args.out) / f"{args.name}{suffix}", overwrite=args.overwrite)
                check_not_an_input(Path(args.out) / f"{args.name}{suffix}", _inputs(args))
            run = {"selectivity": _selectivity, "prune": _prune, "curves": _curves}[args.command]
            report, plot = run(args)
            png, json_path = write_report(report, plot, out_dir=args.out, name=args.name)
    # MisconfigurationException: Lightning's type for a setting it cannot honour.
    except (GexError, MisconfigurationException) as err:
        hint = _DATA_HINT if isinstance(err, DataNotFoundError) else ""
        print(f"gex analyze {args.command}: error: {one_line(err)}{hint}", file=sys.stderr)
        return 2
    print(f"-> {png}\n-> {json_path}")
    return 0
