"""`gex bench net`: a training step of each network, lean path vs plain, as ratios to a baseline."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.context_spec import GE_VARIANTS
from .environment import check_device
from .lean import lean_path
from .memory import TrainStep, peak_bytes, saved_bytes
from .timing import paired_ratio, time_samples

__all__ = ["NET_MODELS", "bench_net"]

NET_MODELS = ("resnet50", *(f"{variant}_resnet50" for variant in (*GE_VARIANTS, "se")))


def _net_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, lean: bool, autocast: torch.dtype | None
) -> TrainStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    device = x.device

    def forward() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with lean_path(lean), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return F.cross_entropy(model(x), target)

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels run asynchronously; count all of them

    return TrainStep(forward, finish)


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
    if compile:
        # Each model is another instance of the same forward code, which dynamo counts as a
        # recompile of that code; past its limit (8) it would silently run the later models eagerly.
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 4 * len(models) + 8)
    for name in models:
        torch.manual_seed(0)
        # Global gathers sized for the benchmark image (no kernel resampling in every step).
        model = create_model(name, input_size=image_size).train().to(target_device, memory_format=fmt)
        built[name] = model
        runner = torch.compile(model) if compile else model
        paths = ("plain",) if name == models[0] or compile else ("plain", "ours")
        for path in paths:
            steps[f"{name}/{path}"] = _net_step(runner, x, target, lean=path == "ours", autocast=autocast)
    # The counted run doubles as the warm-up (and as the compile run under torch.compile).
    memory = {key: saved_bytes(step, exclude=(built[key.split("/")[0]],)) for key, step in steps.items()}
    cuda = target_device.type == "cuda"
    peak = {key: peak_bytes(step, target_device) for key, step in steps.items()} if cuda else {}
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
        if cuda:
            row.update(peak_bytes=peak[key], peak_vs_baseline=peak[key] / peak[base])
        rows.append(row)
        if progress:
            progress(row)
    return rows
