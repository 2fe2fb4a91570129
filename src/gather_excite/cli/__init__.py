"""The ``gex`` command line: one module per sub-command, each with ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

from ..errors import GexError, one_line

# name -> (module under gather_excite.cli, one-line help). Modules load lazily so that
# `gex ops` does not pay for importing Lightning.
COMMANDS: dict[str, tuple[str, str]] = {
    "ops": ("ops", "list the paper's operator variants with their parameter counts"),
    "complexity": ("complexity", "params and MACs of the paper's Tables 1-5 next to the paper's figures"),
    "train": ("train", "train a model from a YAML recipe (Lightning)"),
    "eval": ("evaluate", "evaluate a checkpoint: top-1/top-5 error, params, MACs to JSON"),
    "export": ("export", "export a model: safetensors (a Hub-ready folder), onnx or pt2 (checked against eager)"),
    "compare": ("compare", "train and compare baseline/SE/GE variants on Fashion-MNIST (the main job)"),
    "bench": ("bench", "speed and memory benchmarks of the operators and networks"),
    "analyze": ("analyze", "the paper's Section 4 analyses: selectivity, prune, curves"),
    "detect": ("detect", "Faster R-CNN on a GE backbone: train, eval (COCO AP), data (Fashion-MNIST canvases)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gex <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `gex <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gex: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"gather_excite.cli.{COMMANDS[name][0]}")
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("gather_excite.cli"):
            print(f"gex: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.main(rest) or 0)
    except GexError as err:
        # Every command reports its user errors itself; this catches one that reached here all the same.
        print(f"gex {name}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
