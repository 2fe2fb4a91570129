"""``gex export``: write a trained model in a format other tools load; one function per ``--format``.

``safetensors`` writes a folder (``model.safetensors``, ``config.json``, a Hub model card) that
``create_model(name, pretrained=FOLDER)`` loads and ``--push-to-hub ORG/REPO`` uploads.
A new format is one more entry in :data:`EXPORTERS`: a function ``(args) -> str`` (the line to
print) and, if it needs options, an ``add_<format>_arguments(parser)`` call in :func:`_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError, GexError, one_line

__all__ = ["EXPORTERS", "main"]


def _eval_figures(args: argparse.Namespace) -> dict[str, object]:
    """``--eval-json``, else ``eval.json`` of ``gex eval`` (beside the checkpoint) or ``gex train`` (its run folder)."""
    if args.eval_json:
        path = Path(args.eval_json)
        if not path.is_file():
            raise ConfigError(f"--eval-json {args.eval_json!r}: no such file")
    else:
        checkpoint = Path(args.checkpoint).expanduser().resolve()
        found = [folder / "eval.json" for folder in (checkpoint.parent, checkpoint.parent.parent)]
        found = [candidate for candidate in found if checkpoint.is_file() and candidate.is_file()]
        if not found:
            return {}
        path = found[0]
    with open(path) as handle:
        figures = json.load(handle)
    if not isinstance(figures, dict):
        raise ConfigError(f"--eval-json {str(path)!r}: expected a JSON object (gex eval's output)")
    return figures


def _export_safetensors(args: argparse.Namespace) -> str:
    from ..hub import export_pretrained, push_to_hub

    if args.out is None:
        raise ConfigError("--out is required: the folder to write model.safetensors, config.json and README.md into")
    out = export_pretrained(args.checkpoint, args.out, eval_results=_eval_figures(args), repo_id=args.push_to_hub)
    message = (
        f"wrote {out}/model.safetensors, config.json, README.md (load: create_model(..., pretrained={str(out)!r}))"
    )
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        message += f"\npushed to {url} (load: pretrained='hf-hub:{args.push_to_hub}')"
    return message


# format -> exporter; each returns the line(s) to print and raises a GexError on bad input.
EXPORTERS: dict[str, Callable[[argparse.Namespace], str]] = {
    "safetensors": _export_safetensors,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gex export",
        description="Export a checkpoint. safetensors: a folder with model.safetensors, config.json (architecture, "
        "constructor arguments, input size, mean/std, class names, eval figures) and a Hub model card.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by gex train / gex compare")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="what to write")
    parser.add_argument("--out", default=None, help="where to write it (a folder for safetensors)")
    hub = parser.add_argument_group("safetensors")
    hub.add_argument(
        "--eval-json", default=None, help="figures for the card (default: eval.json beside the checkpoint)"
    )
    hub.add_argument("--push-to-hub", default=None, metavar="ORG/REPO", help="upload the folder (needs network)")
    hub.add_argument("--private", action="store_true", help="create the Hub repository as private")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the chosen format's exporter."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        print(EXPORTERS[args.format](args))
    except (GexError, OSError) as err:  # OSError: a download or upload that cannot reach its server
        print(f"gex export: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0
