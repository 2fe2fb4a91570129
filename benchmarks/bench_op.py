"""Operator benchmark: BN + each Gather-Excite/SE variant at ResNet-50's four stage shapes.

Forward+backward time and saved-activation bytes of the lean path against the plain PyTorch
composition and timm's ``GatherExcite`` (where timm builds the variant), measured in one run.
Same as ``gex bench op``; e.g. ``python benchmarks/bench_op.py --repeats 9 --json``.
"""

import sys

from gather_excite.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["op", *sys.argv[1:]]))
