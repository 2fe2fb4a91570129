"""Every ``--help``: a description of the command, and a help text for each option (with its default where
the option has one that matters)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gather_excite.cli import analyze as analyze_cli
from gather_excite.cli import bench as bench_cli
from gather_excite.cli import compare as compare_cli
from gather_excite.cli import detect as detect_cli
from gather_excite.cli import evaluate as eval_cli
from gather_excite.cli import train as train_cli

ROOT = Path(__file__).resolve().parent.parent

# An entry of jsonargparse's help: an option ("  --model.lr LR ...") or a link ("  data.min_size --> model.min_size").
_ENTRY = re.compile(r"^  (?P<entry>-\S.*?|[\w.]+ --> [\w.]+.*?)(?:\s{2,}(?P<help>\S.*))?$")


def option_helps(text: str) -> dict[str, str]:
    """``{entry: its help text}`` of a ``--help`` output: the text beside the entry and on the lines indented
    under it, up to the next entry, group title or blank line."""
    helps: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _ENTRY.match(line)
        if match:
            current = helps.setdefault(match["entry"].strip(), [])
            current.append(match["help"] or "")
        elif current is not None and line.startswith("    ") and line.strip():
            current.append(line.strip())
        else:
            current = None
    return {entry: " ".join(part for part in parts if part).strip() for entry, parts in helps.items()}


def lacking_help(helps: dict[str, str]) -> list[str]:
    """The entries without a help text of their own: none, only jsonargparse's "(type: ..., default: ...)",
    or jsonargparse's words for a link target without one."""
    return [
        entry for entry, text in helps.items() if not text or text.startswith("(type:") or "lacks type and help" in text
    ]


def test_the_check_finds_an_option_without_help() -> None:
    text = """usage: x

options:
  --model.lr LR         (type: float, default: 0.1)
  --model.momentum MOMENTUM
                        (type: float, default: 0.9)
  --model.arch ARCH     a registered model name
                        (type: str, default: cifar_resnet20)
  --model.representation_size REPRESENTATION_SIZE
                        width of the box head (type: int, default: 1024)
  --flag
  --data CONFIG         Path to a configuration file.

Linked arguments:
  data.min_size --> model.min_size [applied on parse]
                        Target 'model.min_size' lacks type and help (type:
                        int)
"""
    helps = option_helps(text)
    assert helps["--model.arch ARCH"].startswith("a registered model name")
    assert helps["--model.representation_size REPRESENTATION_SIZE"].startswith("width of the box head")
    assert sorted(lacking_help(helps)) == [
        "--flag",
        "--model.lr LR",
        "--model.momentum MOMENTUM",
        "data.min_size --> model.min_size [applied on parse]",
    ]


def _help(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


# What the brief of each option must say, for a few (a word of the accepted values or of the unit).
_TRAIN_WORDS = {
    "--model.pretrained": "hf-hub:ORG/REPO",
    "--model.context_init": "identity",
    "--model.num_classes": "class",
    "--model.input_size": "pixels",
    "--model.milestones": "multistep",
    "--model.plateau_drops": "plateau",
    "--data.crop_size": "pixels",
    "--data.resize_size": "pixels",
    "--data.subset_seed": "seed",
    "--data.persistent_workers": "loader processes",
}
_DETECT_WORDS = {
    "--model.backbone_kwargs": "create_model",
    "--model.anchor_sizes": "pixels",
    "--model.aspect_ratios": "ratio",
    "--model.warmup_factor": "warm-up",
    "--data.train_images": "folder",
    "--data.val_annotations": "JSON",
    "--data.min_size": "pixels",
    "data.min_size --> model.min_size": "pixels",
    "data.max_size --> model.max_size": "pixels",
}


@pytest.mark.parametrize(
    ("command", "words", "description"),
    [
        (["train"], _TRAIN_WORDS, "Train a classification network from a YAML recipe"),
        (["detect", "train"], _DETECT_WORDS, "Train a Faster R-CNN detector on a GE backbone"),
    ],
    ids=["gex train", "gex detect train"],
)
def test_lightning_commands_describe_themselves_and_every_option(
    command: list[str], words: dict[str, str], description: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main = train_cli.main if command == ["train"] else detect_cli.main
    text = _help(main, [*command[1:], "--help"], capsys)
    assert "Lightning Trainer command line tool" not in text
    assert description in " ".join(text.split())
    helps = option_helps(text)
    # Lightning's own options (--trainer.*) carry Lightning's docstrings; the rest are this package's.
    ours = {entry: help_ for entry, help_ in helps.items() if not entry.startswith("--trainer")}
    assert len(ours) > 30 and any(entry.startswith("--trainer.") for entry in helps)  # the check saw them
    assert lacking_help(ours) == []
    for option, word in words.items():
        (entry,) = [e for e in ours if e == option or e.startswith(option + " ")]
        # argparse wraps at hyphens too ("hf-" / "hub:"): compared without the spaces
        assert word.replace(" ", "") in ours[entry].replace(" ", ""), (entry, ours[entry])


def _actions(parser: argparse.ArgumentParser, prog: str = "") -> dict[str, argparse.Action]:
    """``{"<prog> --option": action}`` of the parser and of its sub-commands' parsers."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_actions(sub, f"{prog} {name}".strip()))
        elif not isinstance(action, argparse._HelpAction):
            found[f"{prog} {'/'.join(action.option_strings) or action.dest}".strip()] = action
    return found


@pytest.mark.parametrize(
    "parser",
    [
        compare_cli._parser(),
        bench_cli.build_parser(),
        detect_cli._data_parser(),
        detect_cli._eval_parser(),
        eval_cli._parser(),
        analyze_cli._parser(),
    ],
    ids=["compare", "bench", "detect data", "detect eval", "eval", "analyze"],
)
def test_argparse_commands_give_every_option_a_help(parser: argparse.ArgumentParser) -> None:
    actions = _actions(parser)
    assert [name for name, action in actions.items() if not (action.help or "").strip()] == []


def _format(parser: argparse.ArgumentParser, *subcommand: str) -> str:
    for name in subcommand:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return " ".join(parser.format_help().split())


def test_argparse_helps_show_the_defaults() -> None:
    compare = _format(compare_cli._parser())
    for option, default in (("--width WIDTH", "16"), ("--batch-size BATCH_SIZE", "128"), ("--lr LR", "0.1")):
        assert re.search(rf"{re.escape(option)} (?:(?! --).)*default {re.escape(default)}\b", compare), option
    data = _format(detect_cli._data_parser())
    for option, default in (("--canvas-size", "96"), ("--train-count", "2000"), ("--val-count", "300"),
                            ("--seed", "0"), ("--max-overlap", "0.2")):  # fmt: skip
        assert re.search(rf"{option} \S+ [^-]*\(default {re.escape(default)}\)", data), option
    for what in ("op", "net"):
        text = _format(bench_cli.build_parser(), what)
        assert f"`gex bench {what}`:" in text  # a description of its own
        assert re.search(r"--repeats REPEATS timed [^-]*median [^-]*\(default \d+\)", text)
        assert re.search(r"--channels-last NHWC", text)
    net = _format(bench_cli.build_parser(), "net")
    assert "any registered model" in net and re.search(r"--image-size IMAGE_SIZE [^-]*pixels", net)
    assert "ResNet-50 training step" not in _format(bench_cli.build_parser())


def test_analyze_takes_the_accelerators_of_gex_eval() -> None:
    def choices(parser: argparse.ArgumentParser) -> list[tuple[str, tuple[str, ...]]]:
        return sorted(
            (name, tuple(action.choices))
            for name, action in _actions(parser).items()
            if "--accelerator" in action.option_strings
        )

    (evaluation,) = choices(eval_cli._parser())
    analyses = choices(analyze_cli._parser())
    assert evaluation[1] == ("auto", "cpu", "gpu", "cuda", "mps")
    assert [name for name, _ in analyses] == ["prune --accelerator", "selectivity --accelerator"]
    assert all(accelerators == evaluation[1] for _, accelerators in analyses)
    assert analyze_cli._device("cpu").type == "cpu"


def test_the_benchmark_report_has_a_help() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: benchmarks/report.py") and not done.stderr
    missing = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "missing.json"], capture_output=True, text=True,
        timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert missing.returncode == 2 and "missing.json" in missing.stderr and "Traceback" not in missing.stderr
