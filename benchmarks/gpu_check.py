"""One GPU session's checks in under 8 minutes: the CUDA tests and the GPU benchmark rows, as one JSON file.

Run through ``scripts/gpu-check [OUT.json]`` (default: ``$OUT/gpu-check.json`` when ``$OUT`` is set,
else ``gpu-check.json``). Steps, each with its own time limit so that the whole stays under 8 minutes:

1. ``tests/test_cuda.py``: the lean path against the plain composition on the GPU (float32; bf16
   autocast with channels_last) and DDP over NCCL in one process;
2. ``gex bench net --device cuda --bf16 --channels-last --clock wall`` eager (plain and lean paths);
3. the same under ``torch.compile`` (fewer models: compiling ResNet-50 takes about a minute).

Without a CUDA device it prints one line and exits with status 1 (nothing was checked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the whole run, with a margin for start-up and writing; GPU_CHECK_BUDGET_S shortens it for a lease
# that must leave room for a second try
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", 8 * 60 - 20))
GEX = "import sys; from gather_excite.cli import main; sys.exit(main(sys.argv[1:]))"
EAGER_MODELS = ["resnet50", "ge_theta_minus_resnet50", "ge_theta_resnet50", "ge_theta_plus_resnet50", "se_resnet50"]
COMPILED_MODELS = ["resnet50", "ge_theta_minus_resnet50", "ge_theta_resnet50", "ge_theta_plus_resnet50"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-check",
        description="One GPU session's checks in under 8 minutes (GPU_CHECK_BUDGET_S seconds where set): "
        "tests/test_cuda.py, then gex bench net --device cuda --bf16 --channels-last eager and under "
        "torch.compile, written as one JSON file. Without a CUDA device it says so and exits 1.",
    )
    parser.add_argument(
        "out",
        nargs="?",
        default=None,
        metavar="OUT.json",
        help="the JSON file to write (default: $OUT/gpu-check.json where $OUT is set, else ./gpu-check.json)",
    )
    return parser


def _out_path(out: str | None) -> Path:
    if out:
        return Path(out)
    return Path(os.environ["OUT"]) / "gpu-check.json" if os.environ.get("OUT") else Path("gpu-check.json")


def _run(command: list[str], limit_s: float) -> dict[str, object]:
    """Run ``command`` with at most ``limit_s`` seconds; its status, duration and output tail."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(limit_s, 1))
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:
        status = "timeout"
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    return {"command": command, "status": status, "seconds": round(time.monotonic() - started, 1),
            "stdout": stdout, "stderr_tail": stderr[-4000:]}  # fmt: skip


def _bench(extra: list[str], models: list[str], limit_s: float) -> dict[str, object]:
    args = ["bench", "net", "--device", "cuda", "--bf16", "--channels-last", "--clock", "wall",
            "--batch", "64", "--repeats", "5", "--json", "--models", *models, *extra]  # fmt: skip
    result = _run([sys.executable, "-c", GEX, *args], limit_s)
    try:
        result["result"] = json.loads(result.pop("stdout"))
    except (json.JSONDecodeError, TypeError):
        result["stdout_tail"] = str(result.get("stdout", ""))[-4000:]
        result.pop("stdout", None)
    return result


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)  # --help: the usage, before torch is imported or anything is run
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)  # fmt: skip
        return 1
    out = _out_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "cuda": torch.version.cuda, "steps": {}}  # fmt: skip
    steps: dict[str, object] = report["steps"]  # type: ignore[assignment]

    def remaining(share: float) -> float:
        return (deadline - time.monotonic()) * share

    tests = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], remaining(0.3))
    tests["stdout_tail"] = str(tests.pop("stdout"))[-4000:]
    steps["tests"] = tests
    out.write_text(json.dumps(report, indent=1))
    steps["bench_eager"] = _bench([], EAGER_MODELS, remaining(0.25))
    out.write_text(json.dumps(report, indent=1))
    steps["bench_compiled"] = _bench(["--compile"], COMPILED_MODELS, remaining(0.95))
    out.write_text(json.dumps(report, indent=1))
    failed = [name for name, step in steps.items() if step["status"] != 0]  # type: ignore[index]
    print(f"gpu-check on {report['device']}: " + (f"failed: {', '.join(failed)}" if failed else "all steps passed")
          + f" -> {out}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
