"""`gex bench op|net`: the command line of :mod:`gather_excite.bench` (parses arguments, prints rows)."""

from __future__ import annotations

import argparse
import json

import torch

from ..bench import CLOCKS, NET_MODELS, OP_VARIANTS, STAGES, bench_net, bench_op, check_device, environment
from ..layers import ContextSpec
from ..models import split_model_name
from ._args import int_at_least

__all__ = ["build_parser", "main"]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _print_columns(*columns: str) -> None:
    print(" | ".join(columns), flush=True)


def _print_op(row: dict) -> None:
    s, m = row["seconds"], row["saved_bytes"]
    paths = {"bn": "bn_only", "plain": "plain", "ours": "ours", "timm": "timm"}
    ms = " ".join(f"{name} {s[key] * 1e3:7.1f}" if key in s else f"{name} {'-':>7}" for name, key in paths.items())
    mib = " ".join(f"{name} {_mb(m[key]):>7}" if key in m else f"{name} {'-':>7}" for name, key in paths.items())
    vs_timm = f"{row['time_vs_timm']:.2f}x" if row["time_vs_timm"] is not None else "  -  "
    ratios = f"ours/plain {row['time_vs_plain']:.2f}x {row['bytes_vs_plain']:.2f}x  ours/timm time {vs_timm}"
    _print_columns(f"{row['variant']:<18} {row['channels']:>4}x{row['size']:<3}", f"ms  {ms}", f"MiB {mib}", ratios)


def _print_net(row: dict) -> None:
    q1, q3 = row["time_vs_baseline_quartiles"]
    _print_columns(
        f"{row['model']:<26} {row['path']:<5} cl={int(row['channels_last'])} compile={int(row['compile'])} "
        f"{row['device']} autocast={row['autocast']}",
        f"step {row['seconds']:7.3f} s ({row['time_vs_baseline']:.3f}x, quartiles {q1:.3f}-{q3:.3f})",
        f"saved {_mb(row['saved_bytes']):>9} MiB ({row['bytes_vs_baseline']:.3f}x)",
        *([f"peak {_mb(row['peak_bytes']):>9} MiB ({row['peak_vs_baseline']:.3f}x)"] if "peak_bytes" in row else []),
    )


# Training steps: BatchNorm in training mode needs more than one value per channel, and a global
# gather's BatchNorm (GE-θ, GE-θ+) sees one value per image.
_BATCH_HELP = "images per training step (default %(default)s; GE-θ/GE-θ+ at global extent need 2 or more)"
_ONE_VALUE = "Expected more than 1 value per channel when training"


def build_parser() -> argparse.ArgumentParser:
    """The `gex bench` argument parser (also used by the scripts in ``benchmarks/``)."""
    parser = argparse.ArgumentParser(
        prog="gex bench",
        description="`gex bench op|net`: time and saved-activation memory of the operators and networks.",
    )
    sub = parser.add_subparsers(dest="what", required=True)
    op = sub.add_parser(
        "op",
        help="operators at ResNet-50's four stage shapes: ours vs plain vs timm",
        description="`gex bench op`: forward+backward time and saved-activation memory of BatchNorm followed by "
        "each context operator, at ResNet-50's four stage shapes (224 px input): our implementation against the "
        "plain composition of PyTorch ops and timm's, with BatchNorm alone as the reference.",
    )
    op.add_argument("--variants", nargs="+", default=list(OP_VARIANTS), help="context spec strings (default: all)")
    op.add_argument("--batch", type=int_at_least(1), default=8, help=_BATCH_HELP)
    op.add_argument("--repeats", type=int_at_least(1), default=7,
                    help="timed rounds of each operator; the median is reported (default %(default)s)")  # fmt: skip
    op.add_argument("--stages", type=int_at_least(1), nargs="+", default=None,
                    help="stage indices 1..4 (conv2_x..conv5_x) to run; default all")  # fmt: skip
    op.add_argument("--channels-last", action="store_true",
                    help="NHWC (torch.channels_last) inputs instead of contiguous NCHW")  # fmt: skip
    net = sub.add_parser(
        "net",
        help="a network's training step: baseline vs GE/SE variants, plain vs ours",
        description="`gex bench net`: time and saved-activation memory (peak memory on CUDA) of a training step "
        "(forward, loss, backward, SGD) of each model on random images, plain and with the memory-lean path of "
        "the context modules (ours), relative to the first model (by default ResNet-50 and its GE/SE variants; any "
        "registered model name works).",
    )
    net.add_argument("--models", nargs="+", default=list(NET_MODELS),
                     help="registered model names; the first is the baseline (default: resnet50 and its GE/SE "
                     "variants)")  # fmt: skip
    net.add_argument("--batch", type=int_at_least(1), default=16, help=_BATCH_HELP)
    net.add_argument("--image-size", type=int_at_least(1), default=224,
                     help="side in pixels of the square random input images; the global gathers are sized for it "
                     "(default %(default)s)")  # fmt: skip
    net.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=3,
        help="timed training steps of each model; the median is reported (default %(default)s)",
    )
    net.add_argument("--channels-last", action="store_true",
                     help="NHWC (torch.channels_last) models and inputs instead of contiguous NCHW")  # fmt: skip
    net.add_argument("--compile", action="store_true", help="torch.compile each model (plain path only)")
    net.add_argument(
        "--device", default="cpu", help="e.g. cpu, cuda, cuda:1 (default %(default)s; use --clock wall off the CPU)"
    )
    net.add_argument("--bf16", action="store_true", help="forward and loss under torch.autocast(bfloat16)")
    for p in (op, net):
        p.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's choice)")
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
        p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                       help="wall-clock time, or the process's CPU time (steadier on a shared machine; "
                       "default %(default)s)")  # fmt: skip
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    try:
        check_device(device, args.clock)
    except ValueError as err:
        raise SystemExit(f"gex bench {args.what}: {err}") from None
    names = [("--variants", ContextSpec.parse, getattr(args, "variants", ())),
             ("--models", split_model_name, getattr(args, "models", ()))]  # fmt: skip
    for option, check, values in names:
        for value in values:
            try:
                check(value)
            except ValueError as err:
                raise SystemExit(f"gex bench {args.what}: {option}: {err}") from None
    env = environment(device)
    if not args.json:
        print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    try:
        rows = _run(args, progress=None if args.json else (_print_op if args.what == "op" else _print_net))
    except ValueError as err:
        if _ONE_VALUE not in str(err):
            raise
        raise SystemExit(
            f"gex bench {args.what}: --batch {args.batch}: a BatchNorm sees one value per channel in a training "
            "step (a global GE-θ/GE-θ+ gather's, one per image); use --batch 2 or more"
        ) from None
    if args.json:
        print(json.dumps({"environment": env, "command": ["gex", "bench", *argv], "rows": rows}, indent=1))
    return 0


def _run(args: argparse.Namespace, progress) -> list[dict]:
    if args.what == "op":
        if args.stages and any(i > len(STAGES) for i in args.stages):
            raise SystemExit(f"gex bench op: --stages must be in 1..{len(STAGES)}, got {args.stages}")
        stages = tuple(STAGES[i - 1] for i in args.stages) if args.stages else STAGES
        return bench_op(variants=tuple(args.variants), stages=stages, batch=args.batch, repeats=args.repeats,
                        channels_last=args.channels_last, clock=args.clock, progress=progress)  # fmt: skip
    return bench_net(models=tuple(args.models), batch=args.batch, image_size=args.image_size,
                     repeats=args.repeats, channels_last=args.channels_last, compile=args.compile,
                     clock=args.clock, device=args.device, autocast=torch.bfloat16 if args.bf16 else None,
                     progress=progress)  # fmt: skip
