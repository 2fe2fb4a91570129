"""Render the JSON of ``gex bench op|net --json`` as the Markdown tables of the README.

Usage: ``python benchmarks/report.py op.json [net.json ...]``.
"""

from __future__ import annotations

import argparse
import json
import sys

MIB = 2**20


def _op_table(doc: dict) -> list[str]:
    lines = [
        "| variant | stage shape | BN alone ms | plain ms | timm ms | ours ms | ours/plain time | ours/timm time "
        "| plain MiB | ours MiB | ours/plain bytes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in doc["rows"]:
        s, m = row["seconds"], row["saved_bytes"]
        timm = f"{s['timm'] * 1e3:.1f}" if "timm" in s else "n/a"
        vs_timm = f"{row['time_vs_timm']:.2f}x" if row["time_vs_timm"] is not None else "n/a"
        lines.append(
            f"| {row['variant']} | {row['channels']}x{row['size']}x{row['size']} | {s['bn_only'] * 1e3:.1f} "
            f"| {s['plain'] * 1e3:.1f} | {timm} | {s['ours'] * 1e3:.1f} | {row['time_vs_plain']:.2f}x | {vs_timm} "
            f"| {m['plain'] / MIB:.1f} | {m['ours'] / MIB:.1f} | {row['bytes_vs_plain']:.2f}x |"
        )
    errors = sorted({row["timm_error"] for row in doc["rows"] if row["timm_error"]})
    lines += ["", *(f"timm could not build some variants: `{e}`" for e in errors)]
    return lines


def _net_table(doc: dict) -> list[str]:
    lines = [
        "| model | path | step s | time vs ResNet-50 | quartiles | saved MiB | bytes vs ResNet-50 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in doc["rows"]:
        q1, q3 = row.get("time_vs_baseline_quartiles", (row["time_vs_baseline"],) * 2)
        lines.append(
            f"| {row['model']} | {row['path']} | {row['seconds']:.2f} | {row['time_vs_baseline']:.3f}x "
            f"| {q1:.3f}-{q3:.3f} | {row['saved_bytes'] / MIB:,.0f} | {row['bytes_vs_baseline']:.3f}x |"
        )
    return lines


def render(doc: dict) -> str:
    """One Markdown block: the command, the environment, then the table."""
    env = ", ".join(f"{k} {v}" for k, v in doc["environment"].items())
    table = _op_table(doc) if "variant" in doc["rows"][0] else _net_table(doc)
    return "\n".join([f"`{' '.join(doc['command'])}` ({env})", "", *table, ""])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/report.py",
        description="Render the JSON of `gex bench op|net --json` as the Markdown tables of the README.",
    )
    parser.add_argument("paths", nargs="+", metavar="JSON", help="files written by gex bench op|net --json")
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    for path in parser.parse_args(argv).paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as err:
            parser.error(f"{path}: {err}")
        print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
