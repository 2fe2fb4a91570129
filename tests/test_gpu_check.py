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
