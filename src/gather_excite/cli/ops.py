"""`gex ops`: the paper's operator variants and their extra parameters for one branch shape."""

from __future__ import annotations

import argparse
import json

import torch

from ..layers import context_specs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gex ops", description=__doc__)
    parser.add_argument("--channels", type=int, default=256, help="branch channels C (default 256)")
    parser.add_argument("--feature-size", type=int, default=56, help="branch spatial size H=W (default 56)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.channels < 1 or args.feature_size < 1:
        parser.error("--channels and --feature-size must be >= 1")
    x = torch.randn(2, args.channels, args.feature_size, args.feature_size)
    rows = []
    for spec in sorted(context_specs(), key=lambda spec: spec.name):
        module = spec.build(args.channels, feature_size=args.feature_size).eval()
        with torch.no_grad():
            assert module(x).shape == x.shape
        params = sum(p.numel() for p in module.parameters())
        rows.append({"spec": spec.name, "paper": spec.paper_label, "params": params})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"Context modules for C={args.channels}, {args.feature_size}x{args.feature_size} feature map:")
    for row in rows:
        print(f"  {row['spec']:<22} {row['paper']:<20} {row['params']:>10,d} params")
    return 0
