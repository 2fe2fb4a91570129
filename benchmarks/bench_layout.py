"""Which layout and compiler help the sweep's training step: images per CPU-second at one thread.

For each model (ResNet-20 family, 28x28 Fashion-MNIST shape, batch 128, SGD) and each mode
(``eager``, ``eager_cl`` = channels_last, ``compile``, ``compile_cl``): one step to warm up (and
compile), then ``--steps`` timed steps by the process's CPU clock. Each model and mode runs in a
fresh process, so one mode's compiled code or allocator state does not carry into the next.
E.g. ``python benchmarks/bench_layout.py --models cifar_resnet20 ge_theta_cifar_resnet20``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MODES = ("eager", "eager_cl", "compile", "compile_cl")


def one(model: str, mode: str, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from gather_excite import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = create_model(model, num_classes=10, in_chans=1, input_size=28, width=16)
    images, targets = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    if mode.endswith("_cl"):
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step_net = torch.compile(net) if mode.startswith("compile") else net

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(step_net(images), targets).backward()
        optimizer.step()

    wall = time.perf_counter()
    step()
    first = time.perf_counter() - wall
    cpu = time.process_time()
    for _ in range(steps):
        step()
    rate = 128 * steps / (time.process_time() - cpu)
    print(f"| `{model}` | {mode} | {rate:.0f} | {first:.1f} |", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_layout.py", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "ge_theta_cifar_resnet20"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(*args.one, args.steps)
        return 0
    print("| model | mode | train images per CPU-s | first step s (wall) |\n| --- | --- | ---: | ---: |", flush=True)
    for model in args.models:
        for mode in args.modes:
            subprocess.run([sys.executable, __file__, "--one", model, mode, "--steps", str(args.steps)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
