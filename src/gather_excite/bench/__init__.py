"""Speed and memory benchmarks of the operators and networks (``gex bench``, ``benchmarks/``).

Every figure is a ratio against a baseline measured in the same run: runs of the compared
variants are interleaved (the order rotates every repeat) and the median is reported, so a
machine shared with other jobs slows all variants alike. Saved bytes are what autograd keeps
from a training step's forward pass for its backward pass, counted once per storage through
``torch.autograd.graph.saved_tensors_hooks``, parameters excluded.
"""

from .environment import check_device, environment
from .lean import lean_path
from .memory import TrainStep, peak_bytes, saved_bytes
from .net import NET_MODELS, bench_net
from .op import OP_VARIANTS, STAGES, bench_op
from .timing import CLOCKS, paired_ratio, time_interleaved, time_samples

__all__ = [
    "CLOCKS",
    "NET_MODELS",
    "OP_VARIANTS",
    "STAGES",
    "TrainStep",
    "bench_net",
    "bench_op",
    "check_device",
    "environment",
    "lean_path",
    "paired_ratio",
    "peak_bytes",
    "saved_bytes",
    "time_interleaved",
    "time_samples",
]
