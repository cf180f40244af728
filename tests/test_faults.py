# Reliability under faults, with real processes (4 gloo ranks under cpdit-launch's in-process torchrun agent): a
# worker killed with SIGKILL and restarted by the elastic agent, SIGUSR1/SIGTERM preemption (also twice), a hung
# rank, a full disk during a save, corrupt and incompatible checkpoints, the NaN policy and fp16 loss scaling.
# Every interrupted run must end with the same weights as an uninterrupted one. Set CPDIT_FAULT_TABLE=path to get
# the table of what was injected and what happened (for the closing note).
import json
import os
import pickle
import signal
import time

import pytest
import torch
from job_helpers import children, launch, losses, metrics, start, wait_for_step
from process_guard import alive
from safetensors.torch import load_file

from launch.job.checkpoint import complete_checkpoints
from launch.job.ckpt_files import CheckpointRefused, SafeReader, verify_files
from launch.job.loss_scale import DynamicLossScale
from launch.job.preemption import EXIT_PREEMPTED, MARKER
from launch.job.watchdog import EXIT_HANG, slow_ranks

pytestmark = pytest.mark.slow  # real jobs with injected faults

COMMON = [
    "train.steps=8",
    "checkpoint.every=2",
    "checkpoint.keep_last=4",
    "data.num_samples=16",
    "logging.wandb=false",
    "sample.at_end=false",
    "train.export=true",
    "optim.warmup_steps=2",
]
SLOW = ["debug.step_sleep_s=0.4"]
TABLE: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    path = os.environ.get("CPDIT_FAULT_TABLE")
    if path and TABLE:
        with open(path, "a") as f:
            for row in TABLE:
                f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    launch(tmp, "ref", *COMMON)
    return tmp


def final_weights(run_dir):
    return load_file(str(run_dir / "export" / "model.safetensors"))


def assert_same_final_state(tmp, name):
    ref, got = final_weights(tmp / "ref"), final_weights(tmp / name)
    assert ref.keys() == got.keys()
    for k in ref:  # same checkpointed state in, same math: equal to float32 round-off
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    a, _ = losses(tmp / "ref")
    b, _ = losses(tmp / name)
    assert b[8] == pytest.approx(a[8], rel=1e-5)


def events(run_dir, kind):
    return [r for r in metrics(run_dir) if r.get("event") == kind]


def last_step(run_dir):
    return max((r["step"] for r in metrics(run_dir) if "loss" in r and "event" not in r), default=0)


def test_killed_worker_restarts_elastically_and_matches(reference):
    tmp = reference
    proc = start(tmp, "kill", *COMMON, *SLOW, launcher_flags=["--max-restarts", "1"])
    wait_for_step(tmp / "kill", 3, proc)
    workers = children(proc.pid)
    assert len(workers) == 4
    step_at_kill, t_kill = last_step(tmp / "kill"), time.monotonic()
    os.kill(workers[2], signal.SIGKILL)
    while not events(tmp / "kill", "restart") and proc.poll() is None:
        time.sleep(0.05)
    detect = time.monotonic() - t_kill
    assert proc.wait(timeout=240) == 0, (tmp / "kill.log").read_text()[-4000:]
    restart = events(tmp / "kill", "restart")
    resumed = events(tmp / "kill", "resume")
    assert restart and restart[0]["attempt"] == 1 and resumed and resumed[-1]["step"] in (2, 4)
    assert_same_final_state(tmp, "kill")
    TABLE.append(
        dict(
            fault="kill -9 of one worker (rank 2), --max-restarts 1",
            detected_s=round(detect, 1),
            steps_lost=step_at_kill - resumed[-1]["step"],
            exit_code=0,
            final_state="equal",
        )
    )


def test_a_killed_agent_takes_its_workers_with_it(tmp_path):
    """torchrun puts each worker in a session of its own: without launch/lifeline.py a launcher killed outright
    (SIGKILL, the OOM killer, a test's timeout) would leave its 4 workers training with nobody to stop them."""
    proc = start(tmp_path, "orphan", *COMMON, "train.steps=400", *SLOW)
    wait_for_step(tmp_path / "orphan", 2, proc)
    workers = children(proc.pid)
    assert len(workers) == 4
    t0 = time.monotonic()
    proc.kill()
    proc.wait(timeout=30)
    while any(alive(w) for w in workers) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not [w for w in workers if alive(w)], "workers outlived their agent"
    TABLE.append(
        dict(
            fault="kill -9 of the launcher (torchrun's agent)",
            detected_s=round(time.monotonic() - t0, 1),
            steps_lost="run ends",
            exit_code=-9,
            final_state="no orphaned worker",
        )
    )


def test_preemption_by_signal_checkpoints_exits_75_and_resumes(reference):
    tmp = reference
    run = tmp / "pre"
    # 1) SIGUSR1 to a single worker (SLURM's --signal=USR1@N reaches every task; one is enough)
    proc = start(tmp, "pre", *COMMON, *SLOW, log_name="pre1")
    wait_for_step(run, 2, proc)
    t0 = time.monotonic()
    os.kill(children(proc.pid)[1], signal.SIGUSR1)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp / "pre1.log").read_text()[-4000:]
    first = events(run, "preempted")[-1]
    assert (run / MARKER).is_file()
    assert complete_checkpoints(run / "checkpoints")[-1].name == f"step_{first['step']:08d}"
    TABLE.append(
        dict(
            fault="SIGUSR1 to one worker",
            detected_s=round(time.monotonic() - t0, 1),
            steps_lost=0,
            exit_code=EXIT_PREEMPTED,
            final_state="checkpoint at the next step boundary",
        )
    )
    # 2) resumed; then SIGTERM to the launcher, and a second SIGTERM while it saves
    proc = start(tmp, "pre", *COMMON, *SLOW, log_name="pre2")
    wait_for_step(run, first["step"] + 1, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp / "pre2.log").read_text()[-4000:]
    second = events(run, "preempted")[-1]
    assert second["step"] > first["step"]
    assert not verify_files(complete_checkpoints(run / "checkpoints")[-1], 0, 1)  # the save was not corrupted
    TABLE.append(
        dict(
            fault="SIGTERM x2 to the launcher (second during the save)",
            detected_s=round(time.monotonic() - t0, 1),
            steps_lost=0,
            exit_code=EXIT_PREEMPTED,
            final_state="checkpoint intact",
        )
    )
    # 3) the requeued job finishes with the uninterrupted run's weights
    launch(tmp, "pre", *COMMON)
    assert not (run / MARKER).exists()
    assert_same_final_state(tmp, "pre")


def test_hang_is_detected_dumped_and_ends_the_job(reference):
    tmp = reference
    run = tmp / "hang"
    knobs = ["debug.hang_at_step=3", "debug.fail_rank=1", "dist.watchdog_min_s=3", "dist.watchdog_warmup_s=30"]
    proc = start(tmp, "hang", *COMMON, *knobs)
    wait_for_step(run, 2, proc)
    workers = children(proc.pid)
    t0 = time.monotonic()
    assert proc.wait(timeout=120) == EXIT_HANG, (tmp / "hang.log").read_text()[-4000:]
    detect = time.monotonic() - t0
    report = (run / "hang" / "report.txt").read_text()
    assert "slow rank(s): [1]" in report and "rank 1: step 3, in stuck (debug.hang_at_step)" in report
    assert "last collective entered: " in report
    for r in range(4):
        dump = (run / "hang" / f"rank{r}.txt").read_text()
        assert "Thread" in dump and "most recent call first" in dump  # faulthandler's stacks of every thread
    assert "hang detected" in (tmp / "hang.log").read_text()
    time.sleep(0.5)
    assert not any(alive(p) for p in workers)  # no stuck process left behind
    TABLE.append(
        dict(
            fault="rank 1 stops making progress at step 3",
            detected_s=round(detect, 1),
            steps_lost=1,
            exit_code=EXIT_HANG,
            final_state="stack dumps + report naming rank 1",
        )
    )


def test_a_peer_that_never_arrives_fails_the_job_after_dist_timeout_s(tmp_path):
    """Without the watchdog, dist.timeout_s alone bounds a collective: rank 1 stops at step 3, and its peers'
    collectives in the mesh's tp, cp and FSDP groups (not only the world group's) fail after 15 s; the job exits 1
    naming the timeout."""
    knobs = ["debug.hang_at_step=3", "debug.fail_rank=1", "dist.watchdog=false", "dist.timeout_s=15"]
    r = launch(tmp_path, "timeout", *COMMON, *knobs, check=False, timeout=300)
    assert r.returncode == 1, r.stderr[-4000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cpdit-launch: the job failed: rank ") and "Timed out waiting 15000ms" in last, last


def test_disk_full_during_save_keeps_the_previous_checkpoint(reference):
    tmp = reference
    run = tmp / "full"
    r = launch(
        tmp, "full", *COMMON, "debug.fail_save_at_step=4", "debug.fail_save=io_error", "debug.fail_rank=1", check=False
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-4000:]
    assert "No space left on device" in out and "step_00000002 is intact" in out
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert not verify_files(run / "checkpoints" / "step_00000002", 0, 1)
    launch(tmp, "full", *COMMON)
    assert_same_final_state(tmp, "full")
    TABLE.append(
        dict(
            fault="ENOSPC on rank 1 while saving step 4",
            detected_s=0.0,
            steps_lost=2,
            exit_code=1,
            final_state="step 2 intact; resume equal",
        )
    )


def test_corrupt_checkpoint_is_skipped_or_refused(reference):
    tmp = reference
    src = tmp / "ref" / "checkpoints"
    dst = tmp / "corrupt" / "checkpoints"
    dst.mkdir(parents=True)
    for step in (2, 4, 6):
        os.system(f"cp -r {src / f'step_{step:08d}'} {dst}")
    shard = dst / "step_00000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern, same size
    shard.write_bytes(bytes(data))
    r = launch(tmp, "corrupt", *COMMON, "checkpoint.resume=" + str(dst / "step_00000006"), check=False)
    assert r.returncode == 1 and "failed verification" in r.stdout + r.stderr
    assert "sha256 differs" in r.stdout + r.stderr
    r = launch(tmp, "corrupt", *COMMON)  # auto: past the corrupt one to step 4
    assert "skipping corrupt checkpoint" in r.stderr
    assert events(tmp / "corrupt", "resume")[-1]["step"] == 4
    assert_same_final_state(tmp, "corrupt")
    TABLE.append(
        dict(
            fault="flipped byte in the newest checkpoint",
            detected_s=0.0,
            steps_lost=2,
            exit_code=0,
            final_state="fell back to the previous one; equal",
        )
    )


def test_incompatible_checkpoint_is_refused(reference):
    tmp = reference
    r = launch(tmp, "ref", *COMMON, "model.num_layers=3", "train.steps=10", check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "was written for another model (num_layers: checkpoint 2, this run 3)" in out
    assert [p.name for p in complete_checkpoints(tmp / "ref" / "checkpoints")][-1] == "step_00000008"


def test_nan_policy_stops_and_keeps_the_last_good_checkpoint(reference):
    tmp = reference
    r = launch(tmp, "nan", *COMMON, "debug.nan_at_step=2", "train.max_bad_steps=1", check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "1 consecutive steps with a non-finite loss" in out
    assert "last good checkpoint is kept" in out and "step_00000002" in out
    assert [p.name for p in complete_checkpoints(tmp / "nan" / "checkpoints")] == ["step_00000002"]
    assert events(tmp / "nan", "skipped_step")[0]["step"] == 3


def test_fp16_loss_scaling(reference):
    tmp = reference
    launch(
        tmp,
        "fp16",
        *COMMON,
        "train.mixed_precision=fp16",
        "train.loss_scale=1e12",
        "train.steps=4",
        "train.export=false",
    )
    rows = metrics(tmp / "fp16")
    overflows = [r for r in rows if r.get("event") == "loss_scale_overflow"]
    assert overflows and overflows[0]["loss_scale"] == 5e11  # the first step overflowed: scale halved, step skipped
    logged = [r for r in rows if "loss" in r and "event" not in r]
    assert all(r["loss"] == r["loss"] and r["loss_scale"] <= 5e11 for r in logged)


def test_loss_scale_logic():
    s = DynamicLossScale(scale=8.0, window=2)
    assert not s.update(float("inf")) and s.scale == 4.0 and s.overflows == 1
    assert s.update(1.0) and s.scale == 4.0
    assert s.update(1.0) and s.scale == 8.0  # grows after `window` finite steps


def test_slow_rank_logic():
    def p(step, phases, collectives, collective=None):
        return dict(step=step, phases=phases, collectives=collectives, collective=collective)

    assert slow_ranks({0: p(3, 9, 5, "x"), 1: p(3, 8, 4)}, 3) == [2]  # silent ranks first
    assert slow_ranks({0: p(3, 9, 5, "all_reduce"), 1: p(3, 8, 4)}, 2) == [1]
    assert slow_ranks({0: p(3, 9, 5), 1: p(3, 8, 4), 2: p(3, 9, 6)}, 3) == [1]


def test_checkpoint_metadata_is_never_unpickled_freely(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointRefused, match="posix.system"):
        SafeReader(str(tmp_path)).read_metadata()
    assert not (tmp_path / "pwned").exists()
