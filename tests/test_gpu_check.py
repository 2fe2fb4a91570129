"""``scripts/gpu-check`` on a machine without a GPU: one line that says so, status 1, nothing written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check would run the checks")
def test_gpu_check_without_gpu_says_so_in_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([str(ROOT / "scripts" / "gpu-check"), str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing was run"
    ]
    assert not out.exists()


def test_gpu_check_help_shows_the_usage_and_runs_nothing(tmp_path):
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0 and not done.stderr
    assert done.stdout.startswith("usage: scripts/gpu-check [-h] [OUT.json]")
    assert list(tmp_path.iterdir()) == []  # no gpu-check.json: nothing ran
