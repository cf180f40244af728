# The launcher CLI and mpirun, for real: torchrun started by cpdit-launch, Open MPI's mpirun + mpi4py.
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from launch.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for var in (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "OMPI_COMM_WORLD_RANK",
):
    ENV.pop(var, None)


def _run(cmd, timeout=180, cwd=None):
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.slow
def test_cpdit_launch_starts_torchrun_with_the_knobs(tmp_path):
    exe = shutil.which("cpdit-launch") or sys.executable
    cmd = [exe] if exe.endswith("cpdit-launch") else [exe, "-m", "launch"]
    r = _run(cmd + ["--nproc-per-node", "4", "--cp-size", "2", "--model-parallel-size", "2", "selfcheck"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cpdit selfcheck: OK" in r.stdout
    assert "launcher=torchrun" in r.stdout
    assert "world=4 dp_replicate=1 dp_shard=1 cp=2 (ring=2 x ulysses=1) tp=2" in r.stdout
    assert "groups: dp_replicate=1 dp_shard=1 cp_ring=2 cp_ulysses=1 tp=2 cp=2 dp_shard_cp=2 dp_cp=2" in r.stdout
    assert len(re.findall(r"^  rank \d ", r.stdout, re.M)) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--nproc-per-node", "4", "--cp-size", "3", "selfcheck"],
            "cp_size=3 x model_parallel_size=2 = 6 does not divide world_size=4",
        ),
        (["--nproc-per-node", "4", "--ulysses-size", "3", "selfcheck"], "ulysses_size=3 does not divide cp_size=2"),
        (["--nproc-per-node", "2", "selfcheck"], "= 4 does not divide world_size=2"),
        (["--nnodes", "2", "selfcheck"], "--nnodes > 1 needs --rdzv-endpoint"),
        (["selfcheck", "parallel.cp_sise=2"], "did you mean 'parallel.cp_size'"),
        (["selfcheck", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    ],
)
def test_bad_launch_fails_before_spawning(argv, message, capsys, nothing_starts):
    assert main(argv, environ={}) == 2
    assert message in capsys.readouterr().err


def test_bad_environment_inside_launcher(capsys):
    environ = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert main(["selfcheck"], environ=environ) == 2
    assert "MASTER_PORT missing" in capsys.readouterr().err
    # inside a launcher the world size is the launcher's: cp x tp = 4 does not fit 2 ranks
    environ = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    assert main(["selfcheck"], environ=environ) == 2
    assert "does not divide world_size=2" in capsys.readouterr().err


def test_single_process_runs_in_process(capsys):
    assert (
        main(["--nproc-per-node", "1", "selfcheck", "parallel.cp_size=1", "parallel.model_parallel_size=1"], environ={})
        == 0
    )
    out = capsys.readouterr().out
    assert "launcher=single" in out and "cpdit selfcheck: OK" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install '.[mpi]')")
def test_mpirun_four_ranks(tmp_path):
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        "4",
        sys.executable,
        "-m",
        "launch",
        "selfcheck",
        "parallel.cp_size=2",
        "parallel.model_parallel_size=2",
    ]
    r = _run(cmd, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "launcher=openmpi" in r.stdout and "cpdit selfcheck: OK" in r.stdout
    pairs = re.findall(r"^  rank (\d) \(local (\d), ", r.stdout, re.M)
    assert sorted(int(r_) for r_, _ in pairs) == [0, 1, 2, 3]
    assert sorted(int(l_) for _, l_ in pairs) == [0, 1, 2, 3]  # a permutation: Open MPI 5 maps by core


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install '.[mpi]')")
def test_mpirun_trains_is_preempted_and_resumes(tmp_path):
    """mpirun -n 4 runs the job (mpi4py agrees on the rendezvous); SIGUSR1 to mpirun is forwarded to every rank,
    which checkpoint and exit 75; the same command resumes."""
    from job_helpers import ENV as JOB_ENV
    from job_helpers import TEST_MODEL, metrics, wait_for_step

    from launch.job.preemption import EXIT_PREEMPTED

    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        "4",
        sys.executable,
        "-m",
        "launch",
        "train",
        f"train.output_dir={tmp_path}",
        "train.run_name=mpi",
        *TEST_MODEL,
        "train.steps=6",
        "checkpoint.every=2",
        "data.num_samples=16",
        "logging.wandb=false",
        "sample.at_end=false",
        "train.export=false",
    ]
    log = open(tmp_path / "mpi.log", "w")
    proc = subprocess.Popen(
        [*cmd, "debug.step_sleep_s=0.5"], env=JOB_ENV, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    wait_for_step(tmp_path / "mpi", 2, proc, timeout=180)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "mpi.log").read_text()[-4000:]
    rows = metrics(tmp_path / "mpi")
    assert rows[0]["event"] == "start" and rows[0]["launcher"] == "openmpi"
    stopped = [e for e in rows if e.get("event") == "preempted"][0]["step"]
    r = subprocess.run(cmd, env=JOB_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = metrics(tmp_path / "mpi")
    assert [e for e in rows if e.get("event") == "resume"][0]["step"] == stopped
    assert any(e.get("step") == 6 and "loss" in e for e in rows)


WRAPPERS = [
    ("mpirun.sh", {"NP": "4"}, "launcher=openmpi"),  # 4 ranks on a 2-core machine: the wrapper oversubscribes
    ("torchrun.sh", {"NNODES": "1", "NPROC_PER_NODE": "4"}, "launcher=torchrun"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, variables, launcher", WRAPPERS, ids=[w[0] for w in WRAPPERS])
def test_the_wrapper_scripts_run_the_job(tmp_path, script, variables, launcher):
    """launch/mpirun.sh and launch/torchrun.sh as the README gives them (one node), with this environment's python."""
    if script == "mpirun.sh" and shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (pip install '.[mpi]')")
    wrapper = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", script)
    env = {**ENV, **variables, "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]}
    env.pop("MPIRUN_ARGS", None)
    r = subprocess.run(
        ["bash", wrapper, "selfcheck"], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert launcher in r.stdout and "cpdit selfcheck: OK" in r.stdout
    assert sorted(re.findall(r"^  rank (\d) \(local", r.stdout, re.M)) == ["0", "1", "2", "3"]
