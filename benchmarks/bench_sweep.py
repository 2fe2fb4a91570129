"""Sweep benchmark: training images/s of ``gex compare``'s fast loop against a plain eager PyTorch loop.

Both train ResNet-20 (and its GE-θ version) on Fashion-MNIST with batch 128 in the same run; see
:mod:`gather_excite.bench.sweep` for what each loop is. E.g.
``python benchmarks/bench_sweep.py --rounds 3 --json > sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

from gather_excite.bench.sweep import bench_sweep, format_bench
from gather_excite.data import DEFAULT_FASHION_MNIST_ROOT


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_sweep.py", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "ge_theta_cifar_resnet20"])
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each loop (order alternates)")
    parser.add_argument("--jobs", type=int, default=None, help="fast loop processes (default: CPU cores)")
    parser.add_argument(
        "--plain-threads", type=int, nargs="+", default=None, help="plain loop thread counts (default: cores and 1)"
    )
    parser.add_argument("--compile", action="store_true", help="also time the fast loop with torch.compile")
    parser.add_argument("--json", action="store_true", help="print every sample and the medians as JSON")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    def progress(model: str, kind: str, round_: int, speed: dict) -> None:
        print(
            f"{model} {kind} round {round_ + 1}: {speed['images_per_s']:.0f} images/s, "
            f"{speed['images_per_cpu_s']:.0f} per CPU-s (load {speed['load_average']:.1f})",
            file=sys.stderr,
            flush=True,
        )

    rows = bench_sweep(
        models=tuple(args.models),
        data_root=args.data_root,
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        rounds=args.rounds,
        jobs=args.jobs,
        plain_threads=tuple(args.plain_threads) if args.plain_threads else None,
        compile=args.compile,
        progress=progress,
    )
    print(json.dumps({"command": ["python", "benchmarks/bench_sweep.py", *argv], "rows": rows}, indent=1)
          if args.json else format_bench(rows))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
