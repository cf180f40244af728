# SLURM for real: a one-node cluster (slurmctld + slurmd + munge from Debian's packages, on 127.0.0.1) runs
# launch/slurm.sbatch through `sbatch --wait`, a preemption by `scancel --signal=USR1` that checkpoints, exits 75,
# is requeued by the script and resumes, and `srun --ntasks=4 python -m launch` with no torchrun in between.
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from job_helpers import ENV, TEST_MODEL, losses, metrics, wait_for_step
from slurm_cluster import SlurmCluster, ensure_packages

pytestmark = pytest.mark.slow  # a real SLURM cluster

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "launch" / "slurm.sbatch"
SHORT = [
    "train.steps=4",
    "checkpoint.every=2",
    "data.num_samples=16",
    "logging.wandb=false",
    "sample.at_end=false",
    "train.export=false",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.environ.get("CPDIT_SKIP_SLURM"):
        pytest.skip("CPDIT_SKIP_SLURM is set")
    reason = ensure_packages()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def slurm(cluster, *cmd, timeout=300, cwd=None):
    env = {**ENV, "SLURM_CONF": str(cluster.conf)}
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def run_dir_args(tmp, name):
    return [f"train.output_dir={tmp}", f"train.run_name={name}", *TEST_MODEL]


def test_sbatch_runs_the_job(cluster, tmp_path):
    t0 = time.monotonic()
    r = slurm(
        cluster,
        "sbatch",
        "--wait",
        "--parsable",
        f"--output={tmp_path}/slurm-%j.out",
        str(SBATCH),
        "train",
        *run_dir_args(tmp_path, "sb"),
        *SHORT,
        cwd=tmp_path,
    )
    wall = time.monotonic() - t0
    out = next(tmp_path.glob("slurm-*.out")).read_text()
    assert r.returncode == 0, r.stdout + r.stderr + out[-4000:] + cluster.logs()
    start = [e for e in metrics(tmp_path / "sb") if e.get("event") == "start"]
    assert start and start[0]["launcher"] == "slurm" and "world=4" in start[0]["layout"]
    by_step, _ = losses(tmp_path / "sb")
    assert sorted(by_step) == [1, 2, 3, 4]
    print(f"sbatch --wait: {wall:.1f} s")


def test_scancel_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    slow = ["train.steps=8", "debug.step_sleep_s=0.5"]
    r = slurm(
        cluster,
        "sbatch",
        "--parsable",
        f"--output={tmp_path}/slurm-%j.out",
        str(SBATCH),
        "train",
        *run_dir_args(tmp_path, "pre"),
        *SHORT,
        *slow,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]

    class Job:  # wait_for_step's view of a process
        def poll(self):
            return None if cluster.job_state(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING") else 0

    wait_for_step(tmp_path / "pre", 2, Job(), timeout=180)
    t0 = time.monotonic()
    assert slurm(cluster, "scancel", "--signal=USR1", job).returncode == 0
    deadline = time.monotonic() + 240  # the requeued job waits for its old credential to expire (cred_expire=10)
    while time.monotonic() < deadline:
        state = cluster.job_state(job)
        done = any(e.get("step") == 8 for e in metrics(tmp_path / "pre") if "loss" in e)
        if done and state.get("JobState") in ("COMPLETED", None):
            break
        time.sleep(0.5)
    out = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    rows = metrics(tmp_path / "pre")
    preempted = [e for e in rows if e.get("event") == "preempted"]
    resumed = [e for e in rows if e.get("event") == "resume"]
    assert preempted and resumed and resumed[0]["step"] == preempted[0]["step"], out[-4000:]
    assert "cpdit: preempted (exit 75); requeueing job" in out
    assert any(e.get("step") == 8 and "loss" in e for e in rows), out[-4000:]
    assert int(cluster.job_state(job).get("Restarts", "1")) >= 1
    print(f"scancel USR1 -> resumed run finished in {time.monotonic() - t0:.1f} s")


def test_srun_starts_the_ranks_directly(cluster, tmp_path):
    t0 = time.monotonic()
    r = slurm(
        cluster,
        "srun",
        "--ntasks=4",
        "--immediate=60",
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "launch",
        "train",
        *run_dir_args(tmp_path, "srun"),
        *SHORT,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    start = [e for e in metrics(tmp_path / "srun") if e.get("event") == "start"]
    assert start[0]["launcher"] == "slurm" and re.search(r"cp=2 .* tp=2", start[0]["layout"])
    print(f"srun -n4: {time.monotonic() - t0:.1f} s")


def test_a_killed_run_leaves_no_daemons(cluster):
    """Daemons listed by a cluster whose run was killed before its teardown are stopped by the next cluster."""
    from slurm_cluster import REGISTRY, reap_stale

    listed = json.loads(REGISTRY.read_text())
    assert listed and all(Path(f"/proc/{p}").exists() for p in listed)  # this module's cluster registered its own
    sleeper = subprocess.Popen(["sleep", "30"])  # a live pid that is no SLURM daemon: never signalled
    try:
        REGISTRY.write_text(json.dumps([sleeper.pid]))
        assert reap_stale() == [] and sleeper.poll() is None
    finally:
        sleeper.kill()
        REGISTRY.write_text(json.dumps(listed))
