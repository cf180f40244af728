# Running the real job from tests: `python -m launch` (cpdit-launch) as a subprocess with a clean launcher
# environment, reading its metrics, finding its worker processes, waiting for its progress.
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_")
ENV = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
ENV.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")


# Job tests test the machinery, on the tests' `tiny` model with small batches (fast, and the tolerances below are
# for it); the default job itself runs in .ci/run and in tests/test_readme.py. Overrides given later win.
TEST_MODEL = ["model.preset=tiny", "data.batch_size=2"]


def job_cmd(tmp, name, *extra, command="train", nproc=4, launcher_flags=()):
    return [
        sys.executable,
        "-m",
        "launch",
        "--nproc-per-node",
        str(nproc),
        *launcher_flags,
        command,
        f"train.output_dir={tmp}",
        f"train.run_name={name}",
        *TEST_MODEL,
        *extra,
    ]


def launch(tmp, name, *extra, command="train", nproc=4, check=True, launcher_flags=(), timeout=600):
    cmd = job_cmd(tmp, name, *extra, command=command, nproc=nproc, launcher_flags=launcher_flags)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def start(tmp, name, *extra, log_name=None, launcher_flags=()):
    """Start the job in the background; its output goes to <tmp>/<log_name or name>.log."""
    log = open(Path(tmp) / f"{log_name or name}.log", "w")
    cmd = job_cmd(tmp, name, *extra, launcher_flags=launcher_flags)
    return subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


def metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses(run_dir):
    rows = metrics(run_dir)
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}, rows


def wait_for_step(run_dir, step, proc, timeout=120):
    """Block until metrics.jsonl has logged `step` (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", -1) >= step and "loss" in r for r in metrics(run_dir)):
            return
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def children(pid):
    """Direct child processes of `pid` (from /proc): the launcher's workers."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)
