"""`gex bench op|net`: time and saved-activation memory of the operators and networks.

Every figure is a ratio against a baseline measured in the same run: runs of the compared
variants are interleaved (the order rotates every repeat) and the median is reported, so a
machine shared with other jobs slows all variants alike. Saved bytes are what autograd keeps
for the backward pass, counted once per storage through
``torch.autograd.graph.saved_tensors_hooks``, parameters excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import create_context
from ..layers.context_spec import EXTENTS, GE_VARIANTS, ContextSpec
from ..layers.fused import bn_context, fused_enabled, set_fused

__all__ = [
    "bench_net",
    "bench_op",
    "environment",
    "main",
    "paired_ratio",
    "saved_bytes",
    "time_interleaved",
    "time_samples",
]

# ResNet-50's residual-branch outputs (channels, size) at 224 px: conv2_x .. conv5_x.
STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))
# The GE variants of the paper's main tables at every extent, then SE.
OP_VARIANTS = (
    *(ContextSpec(variant, extent).name for variant in GE_VARIANTS for extent in (*EXTENTS, None)),
    "se",
)
NET_MODELS = ("resnet50", *(f"{variant}_resnet50" for variant in (*GE_VARIANTS, "se")))


def environment(device: str = "cpu") -> dict[str, object]:
    """The machine and library versions the figures were measured with."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    # The allocator settings change CPU step times by tens of percent (see the README).
    allocator = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    info["allocator"] = " ".join(f"{k}={v}" for k, v in allocator.items()) or "default"
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@contextlib.contextmanager
def fused(enabled: bool) -> Iterator[None]:
    """Run with :func:`bn_context`'s memory-lean path on or off, restoring the previous setting."""
    previous = fused_enabled()
    set_fused(enabled)
    try:
        yield
    finally:
        set_fused(previous)


def saved_bytes(step: Callable[[], None], *, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Bytes that autograd saves for backward during ``step()``, each storage once, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_samples(
    steps: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds of every call of each step, one per round; the steps' order rotates every round.

    ``clock="cpu"`` counts the process's CPU time instead of wall-clock time: on a machine
    shared with other jobs it is far less disturbed by them (use one thread, so that no time
    is spent spinning in a thread pool).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    timer = CLOCKS[clock]
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = timer()
            steps[name]()
            times[name].append(timer() - start)
    return times


def time_interleaved(
    steps: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call of each step (see :func:`time_samples`)."""
    samples = time_samples(steps, repeats=repeats, warmup=warmup, clock=clock)
    return {name: statistics.median(values) for name, values in samples.items()}


def paired_ratio(samples: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    """Median and quartiles of ``name``'s time over ``base``'s time within each round.

    Ratios of runs taken minutes apart cancel the machine's slow drifts (other jobs, clock
    boosts), which a ratio of the two medians does not.
    """
    ratios = sorted(a / b for a, b in zip(samples[name], samples[base], strict=True))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def _timm_context(spec: str, channels: int, size: int) -> tuple[nn.Module | None, str | None]:
    """timm's ``GatherExcite`` for the same variant, or ``(None, why)`` where timm cannot build it."""
    try:
        from timm.layers import GatherExcite as TimmGatherExcite
    except ImportError as err:
        return None, f"timm not installed ({err})"
    kwargs = ContextSpec.parse(spec).timm_kwargs
    if kwargs is None:
        return None, f"timm's GatherExcite has no equivalent of {spec!r}"
    try:
        return TimmGatherExcite(channels, feat_size=(size, size), **kwargs), None
    except Exception as err:  # report whatever timm raises; the benchmark does not work around it
        return None, f"{type(err).__name__}: {err}"


def _op_step(
    bn: nn.Module, context: nn.Module, z: torch.Tensor, grad: torch.Tensor, *, lean: bool
) -> Callable[[], None]:
    modules = (bn, context)

    def step() -> None:
        for m in modules:
            m.zero_grad(set_to_none=True)
        z.grad = None
        with fused(lean):
            out = bn_context(bn, context, z)
        out.backward(grad)

    return step


def bench_op(
    *,
    variants: tuple[str, ...] = OP_VARIANTS,
    stages: tuple[tuple[int, int], ...] = STAGES,
    batch: int = 8,
    repeats: int = 7,
    channels_last: bool = False,
    clock: str = "wall",
    progress: Callable[[dict], None] | None = None,
) -> list[dict[str, object]]:
    """Forward+backward of BN + each context module: ours vs the plain composition vs timm's."""
    rows = []
    for spec in variants:
        for channels, size in stages:
            torch.manual_seed(0)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            z = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt).requires_grad_()
            grad = torch.randn_like(z)
            bn = nn.BatchNorm2d(channels)
            context = create_context(spec, channels, feature_size=size)
            timm_context, timm_error = _timm_context(spec, channels, size)
            steps = {
                "bn_only": _op_step(bn, nn.Identity(), z, grad, lean=False),
                "plain": _op_step(bn, context, z, grad, lean=False),
                "ours": _op_step(bn, context, z, grad, lean=True),
            }
            if timm_context is not None:
                steps["timm"] = _op_step(bn, timm_context, z, grad, lean=False)
            # The counted run doubles as the warm-up.
            memory = {name: saved_bytes(step, exclude=(bn, context)) for name, step in steps.items()}
            samples = time_samples(steps, repeats=repeats, warmup=0, clock=clock)
            seconds = {name: statistics.median(values) for name, values in samples.items()}
            row: dict[str, object] = {
                "variant": spec, "channels": channels, "size": size, "batch": batch, "clock": clock,
                "channels_last": channels_last,
                "seconds": seconds, "saved_bytes": memory, "timm_error": timm_error,
                "time_vs_plain": paired_ratio(samples, "ours", "plain")[0],
                "bytes_vs_plain": memory["ours"] / memory["plain"],
                "time_vs_timm": paired_ratio(samples, "ours", "timm")[0] if "timm" in samples else None,
                "bytes_vs_timm": memory["ours"] / memory["timm"] if "timm" in memory else None,
            }  # fmt: skip
            rows.append(row)
            if progress:
                progress(row)
    return rows


def _net_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, lean: bool, autocast: torch.dtype | None
) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    device = x.device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with fused(lean), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels run asynchronously; count all of them

    return step


def check_device(device: str, clock: str) -> torch.device:
    """The device to benchmark on; a clear error if it is missing or cannot be timed with ``clock``."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if parsed.type != "cpu" and clock == "cpu":
        raise ValueError(f"clock='cpu' counts host CPU time and cannot time device {device!r}; use clock='wall'")
    return parsed


def bench_net(
    *,
    models: tuple[str, ...] = NET_MODELS,
    batch: int = 16,
    image_size: int = 224,
    repeats: int = 3,
    channels_last: bool = False,
    compile: bool = False,
    clock: str = "wall",
    device: str = "cpu",
    autocast: torch.dtype | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[dict[str, object]]:
    """Training step (forward, loss, backward, SGD) of each model, plain vs ours, vs ``models[0]``.

    ``autocast`` (e.g. ``torch.bfloat16``) runs forward and loss under ``torch.autocast``.
    """
    from ..models import create_model

    target_device = check_device(device, clock)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, device=target_device).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,), device=target_device)
    steps: dict[str, Callable[[], None]] = {}
    built: dict[str, nn.Module] = {}
    for name in models:
        torch.manual_seed(0)
        model = create_model(name).train().to(target_device, memory_format=fmt)
        built[name] = model
        runner = torch.compile(model) if compile else model
        paths = ("plain",) if name == models[0] or compile else ("plain", "ours")
        for path in paths:
            steps[f"{name}/{path}"] = _net_step(runner, x, target, lean=path == "ours", autocast=autocast)
    # The counted run doubles as the warm-up (and as the compile run under torch.compile).
    memory = {key: saved_bytes(step, exclude=(built[key.split("/")[0]],)) for key, step in steps.items()}
    samples = time_samples(steps, repeats=repeats, warmup=1 if compile else 0, clock=clock)
    base = f"{models[0]}/plain"
    rows = []
    for key in steps:
        name, path = key.split("/")
        ratio, q1, q3 = paired_ratio(samples, key, base)
        row = {
            "model": name, "path": path, "batch": batch, "image_size": image_size,
            "channels_last": channels_last, "compile": compile, "clock": clock, "device": str(target_device),
            "autocast": str(autocast).removeprefix("torch.") if autocast is not None else None,
            "seconds": statistics.median(samples[key]), "samples": samples[key], "saved_bytes": memory[key],
            "time_vs_baseline": ratio, "time_vs_baseline_quartiles": [q1, q3],
            "bytes_vs_baseline": memory[key] / memory[base],
        }  # fmt: skip
        rows.append(row)
        if progress:
            progress(row)
    return rows


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _print_op(row: dict) -> None:
    s, m = row["seconds"], row["saved_bytes"]
    timm_t = f"{s['timm'] * 1e3:8.1f}" if "timm" in s else "       -"
    timm_m = f"{_mb(m['timm']):>8}" if "timm" in m else "       -"
    vs_timm = f"{row['time_vs_timm']:.2f}x" if row["time_vs_timm"] is not None else "  -  "
    print(
        f"{row['variant']:<18} {row['channels']:>4}x{row['size']:<3} | ms  bn {s['bn_only'] * 1e3:7.1f} "
        f"plain {s['plain'] * 1e3:7.1f} ours {s['ours'] * 1e3:7.1f} timm {timm_t} | MiB bn {_mb(m['bn_only']):>7} "
        f"plain {_mb(m['plain']):>7} ours {_mb(m['ours']):>7} timm {timm_m} | ours/plain "
        f"{row['time_vs_plain']:.2f}x {row['bytes_vs_plain']:.2f}x  ours/timm time {vs_timm}",
        flush=True,
    )


def _print_net(row: dict) -> None:
    q1, q3 = row["time_vs_baseline_quartiles"]
    print(
        f"{row['model']:<26} {row['path']:<5} cl={int(row['channels_last'])} compile={int(row['compile'])} "
        f"{row['device']} autocast={row['autocast']} | "
        f"step {row['seconds']:7.3f} s ({row['time_vs_baseline']:.3f}x, quartiles {q1:.3f}-{q3:.3f}) | "
        f"saved {_mb(row['saved_bytes']):>9} MiB "
        f"({row['bytes_vs_baseline']:.3f}x)",
        flush=True,
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `gex bench` argument parser (also used by the scripts in ``benchmarks/``)."""
    parser = argparse.ArgumentParser(prog="gex bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    op = sub.add_parser("op", help="operators at ResNet-50's four stage shapes: ours vs plain vs timm")
    op.add_argument("--variants", nargs="+", default=list(OP_VARIANTS), help="context spec strings")
    op.add_argument("--batch", type=_positive, default=8)
    op.add_argument("--repeats", type=_positive, default=7)
    op.add_argument("--stages", type=_positive, nargs="+", default=None,
                    help="stage indices 1..4 (conv2_x..conv5_x) to run; default all")  # fmt: skip
    op.add_argument("--channels-last", action="store_true")
    net = sub.add_parser("net", help="ResNet-50 training step: baseline vs GE/SE variants, plain vs ours")
    net.add_argument("--models", nargs="+", default=list(NET_MODELS), help="model names; the first is the baseline")
    net.add_argument("--batch", type=_positive, default=16)
    net.add_argument("--image-size", type=_positive, default=224)
    net.add_argument("--repeats", type=_positive, default=3)
    net.add_argument("--channels-last", action="store_true")
    net.add_argument("--compile", action="store_true", help="torch.compile each model (plain path only)")
    net.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1 (use --clock wall off the CPU)")
    net.add_argument("--bf16", action="store_true", help="forward and loss under torch.autocast(bfloat16)")
    for p in (op, net):
        p.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
        p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                       help="wall-clock time, or the process's CPU time (steadier on a shared machine)")  # fmt: skip
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
    env = environment(device)
    progress = None
    if not args.json:
        print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    if args.what == "op":
        if args.stages and any(i > len(STAGES) for i in args.stages):
            raise SystemExit(f"gex bench op: --stages must be in 1..{len(STAGES)}, got {args.stages}")
        stages = tuple(STAGES[i - 1] for i in args.stages) if args.stages else STAGES
        progress = None if args.json else _print_op
        rows = bench_op(variants=tuple(args.variants), stages=stages, batch=args.batch, repeats=args.repeats,
                        channels_last=args.channels_last, clock=args.clock, progress=progress)  # fmt: skip
    else:
        progress = None if args.json else _print_net
        rows = bench_net(models=tuple(args.models), batch=args.batch, image_size=args.image_size,
                         repeats=args.repeats, channels_last=args.channels_last, compile=args.compile,
                         clock=args.clock, device=args.device, autocast=torch.bfloat16 if args.bf16 else None,
                         progress=progress)  # fmt: skip
    if args.json:
        print(json.dumps({"environment": env, "command": ["gex", "bench", *argv], "rows": rows}, indent=1))
    return 0
