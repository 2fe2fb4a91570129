"""`gex complexity`: parameters and MACs of every row of the paper's Tables 1-4 (and the Table 5
networks' parameters) next to the paper's figures and the difference.

MACs are the multiply-accumulates of convolutions and linear layers counted by
torch.utils.flop_counter on a batch-1 input (see gather_excite.complexity); "+gates" adds the
context modules' elementwise gate products, which the paper's GFLOPs appear to include.
--count-bn-stats counts the BatchNorm running means and variances as parameters, as Caffe does
(18 of the 24 printed parameter figures are then reproduced, against 10 without). Models are
built on the meta device, so nothing is allocated or computed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..complexity import PAPER_ROWS, measure_paper_row

TITLES = {
    1: "Table 1: GE-θ (global) at one stage of ResNet-50, 224x224",
    2: "Table 2: ResNet-50 based, global extent, 224x224",
    3: "Table 3: ResNet-101 based, global extent, 224x224",
    4: "Table 4: ShuffleNet 1x (g = 3) based, 224x224",
    5: "Table 5 networks: CIFAR-10, 32x32 (the paper gives no complexity)",
}


def _diff(value: float, digits: int) -> str:
    return f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0 turns -0.0 into 0.0


def _params(result: dict[str, Any], count_bn_stats: bool) -> int:
    return result["params"] + (result["bn_stats"] if count_bn_stats else 0)


def _format_row(result: dict[str, Any], count_bn_stats: bool = False) -> str:
    params_m = _params(result, count_bn_stats) / 1e6
    text = f"{params_m:7.2f} M"
    if result["paper_params_m"] is not None:
        text += f" (paper {result['paper_params_m']:.1f} M, {_diff(params_m - result['paper_params_m'], 2)})"
    # ShuffleNet's figures are in MFLOPs in the paper; the ResNets' in GFLOPs.
    scale, unit, digits = (1e6, "M", 1) if result["table"] == 4 else (1e9, "G", 3)
    macs = result["macs"] / scale
    with_gates = (result["macs"] + result["gate_mults"]) / scale
    text += f"  {macs:7.{digits}f} {unit}MACs"
    if result["paper_gflops"] is not None:
        paper = result["paper_gflops"] * 1e9 / scale
        text += f" (paper {paper:g} {unit}, {_diff(macs - paper, digits)})"
        text += f"  +gates {with_gates:.{digits}f} {unit} ({_diff(with_gates - paper, digits)})"
    return f"  {result['row']:<22} {result['model']:<40} {text}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gex complexity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects")
    parser.add_argument(
        "--table", type=int, action="append", choices=sorted(TITLES), help="only this table (repeatable)"
    )
    parser.add_argument(
        "--count-bn-stats",
        action="store_true",
        help="count BatchNorm running means and variances as parameters, as Caffe does (--json always has bn_stats)",
    )
    args = parser.parse_args(argv)
    tables = set(args.table or TITLES)
    results = [measure_paper_row(row) for row in PAPER_ROWS if row.table in tables]
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    current = None
    for result in results:
        if result["table"] != current:
            current = result["table"]
            print(("\n" if current != min(tables) else "") + TITLES[current])
        print(_format_row(result, args.count_bn_stats))
    # How many rows the convention reproduces: the paper prints parameters to one decimal (in M).
    printed = [r for r in results if r["paper_params_m"] is not None]
    if printed:
        same = sum(f"{_params(r, args.count_bn_stats) / 1e6:.1f}" == f"{r['paper_params_m']:.1f}" for r in printed)
        counted = "parameters + BN running statistics" if args.count_bn_stats else "parameters only"
        print(f"\n{same} of {len(printed)} rows give the paper's printed parameter figure ({counted})")
    return 0
