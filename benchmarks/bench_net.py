"""Network benchmark: ResNet-50 training step against its GE-θ−/GE-θ/GE-θ+/SE variants.

Step time (forward, loss, backward, SGD) and saved-activation bytes, lean path and plain path,
each as a ratio to ResNet-50 measured in the same run. Same as ``gex bench net``; e.g.
``python benchmarks/bench_net.py --channels-last`` or ``--compile``.
"""

import sys

from gather_excite.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["net", *sys.argv[1:]]))
