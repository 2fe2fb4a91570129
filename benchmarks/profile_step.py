"""Where a training step's time goes: torch.profiler over a few steps of each (model, path).

    python benchmarks/profile_step.py --device cuda --models se_resnet50 ge_theta_minus_resnet50

For each model and path (plain composition, lean path) it prints the step's wall time, the host
time before the final synchronisation (a step whose host time is close to its wall time is bound
by Python and kernel launches, not by the device), and the kernels with the most self time.
Settings as ``gex bench net --bf16 --channels-last``: SGD step, bf16 autocast, channels_last.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gather_excite.bench.net import _net_step
from gather_excite.models import create_model


def _profile(name: str, lean: bool, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000).to(device).train().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    step = _net_step(model, x, target, lean=lean, autocast=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    walls = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        walls.append(time.perf_counter() - started)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path = "lean" if lean else "plain"
    print(f"\n=== {name} [{path}] wall per step {1000 * min(walls):.1f} ms (min of {args.steps})")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["se_resnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    for name in args.models:
        for lean in (False, True):
            _profile(name, lean, args)


if __name__ == "__main__":
    main()
