# bench/gpu.py is the check to run the day a CUDA device is lent; on CPU its --dry-run goes through the same three
# parts (kernel paths vs float64, the parallelized model step, the default job on one rank) at small shapes, plus the
# CUDA kernel calls on fake CUDA tensors, so the script cannot rot between GPU days. Without CUDA and without
# --dry-run it refuses (exit 2).
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_on_cpu():
    r = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 failure(s)" in r.stdout
    assert r.stdout.count("| yes |") == 7  # 6 kernel cases + the model step
    assert r.stdout.count("| fine |") == 12  # (a0): the CUDA kernel calls on fake CUDA tensors
    assert "backend=gloo exit=0" in r.stdout and ": ok" in r.stdout


def test_gpu_check_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device here; use --dry-run" in r.stderr
