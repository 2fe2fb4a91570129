"""The machine a benchmark runs on: what it records about it, and which devices it can time."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

__all__ = ["check_device", "environment"]


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
