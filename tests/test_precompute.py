# `cpdit-launch precompute` and data.dataset=precomputed as a user runs them (real jobs): training from the directory
# takes the on-the-fly run's steps without the VAE or T5 in memory, an image-to-video model's and a frozen T5's
# entries included, and a precompute killed midway finishes on a rerun without redoing its finished shards.
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from job_helpers import ENV, job_cmd, launch, metrics
from safetensors.torch import load_file
from t5_helpers import make_tiny_t5

pytestmark = pytest.mark.slow  # real cpdit-launch jobs

VAE = ["first_stage.kind=vae", "first_stage.preset=tiny", "data.num_frames=9", "data.num_samples=8"]
RUN = ["logging.wandb=false", "train.export=false", "optim.warmup_steps=1"]


def _steps(run_dir):
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r and "event" not in r}


def _start_event(run_dir):
    return next(r for r in metrics(run_dir) if r.get("event") == "start")


def _assert_same_steps(ref, got, rel):
    assert sorted(ref) == sorted(got) and ref
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=rel), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=rel), step


def test_training_from_precomputed_takes_the_steps_of_the_run_on_the_fly(tmp_path):
    """Precomputed on 2 ranks (the VAE split over cp=2), in shards of 3 (the last one short); trained on 4 ranks
    (cp2 x tp2) for 5 steps of 2 clips, into the second epoch: every step's loss and gradient norm are the
    on-the-fly run's (the posterior sample is drawn per step from the kept mean and logvar), neither VAE nor T5 is
    in memory while training, and the end samples (the VAE built for sampling) are the same videos."""
    out = tmp_path / "pre"
    common = [*VAE, *RUN, "train.steps=5", "data.batch_size=2"]
    launch(
        tmp_path,
        "precompute",
        *VAE,
        f"precompute.output_dir={out}",
        "precompute.shard_size=3",
        command="precompute",
        nproc=2,
        launcher_flags=["--model-parallel-size", "1"],
    )
    index = json.loads((out / "index.json").read_text())
    assert (
        index["complete"]
        and index["clips"] == 8
        and sorted(p.name for p in out.glob("shard-*"))
        == [
            "shard-000000.safetensors",
            "shard-000001.safetensors",
            "shard-000002.safetensors",
        ]
    )
    shard = load_file(str(out / "shard-000002.safetensors"))
    assert set(shard) == {"mean", "logvar"} and shard["mean"].shape == (2, 4, 3, 4, 4)  # (clips, C, T, h, w)
    launch(tmp_path, "fly", *common)
    launch(tmp_path, "pre_run", *common, "data.dataset=precomputed", f"data.path={out}")
    _assert_same_steps(_steps(tmp_path / "fly"), _steps(tmp_path / "pre_run"), rel=1e-6)
    assert _start_event(tmp_path / "fly")["frozen_bytes"]["first_stage"] > 0
    assert _start_event(tmp_path / "pre_run")["frozen_bytes"] == {"first_stage": 0, "frozen_text": 0}
    fly, pre = (
        sorted((tmp_path / "fly" / "samples").glob("*.png")),
        sorted((tmp_path / "pre_run" / "samples").glob("*.png")),
    )
    assert len(fly) == 4 and [p.name for p in fly] == [p.name for p in pre]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(fly, pre, strict=True))


def test_precomputed_image_to_video_and_t5_entries_take_the_run_on_the_fly_steps(tmp_path):
    """An image-to-video model (train.image_noise=clip) with a frozen T5: each entry keeps the noised first frame's
    posterior and the caption's embedding and token mask. Precomputed in one process, trained on 2 ranks (cp=2):
    the on-the-fly run's steps, with the T5 out of memory."""
    t5 = tmp_path / "t5"
    make_tiny_t5(t5)
    out = tmp_path / "pre"
    i2v = ["model.in_channels=8", "model.out_channels=4", "model.pos_embedding=rope", "train.image_noise=clip"]
    text = ["text.encoder=t5", f"text.path={t5}", "model.text_embed_dim=16", "train.text_max_length=8"]
    common = [*VAE, *i2v, *text, "data.dataset=synthetic_i2v", "train.image_dropout=0.25", "sample.at_end=false"]
    single = ["--cp-size", "1", "--model-parallel-size", "1"]
    launch(tmp_path, "p", *common, f"precompute.output_dir={out}", command="precompute", nproc=1, launcher_flags=single)
    shard = load_file(str(out / "shard-000000.safetensors"))
    assert set(shard) == {"mean", "logvar", "image_mean", "image_logvar", "text", "text_mask"}
    assert shard["image_mean"].shape == (8, 4, 1, 4, 4) and shard["text"].shape == (8, 8, 16)
    assert shard["text_mask"].dtype == torch.bool and shard["text_mask"][0].sum() == 4  # "a shape moving x"
    cp2 = ["--cp-size", "2", "--model-parallel-size", "1"]
    run = [*common, *RUN, "train.steps=3", "data.batch_size=4"]
    launch(tmp_path, "fly", *run, nproc=2, launcher_flags=cp2)
    launch(tmp_path, "pre_run", *run, "data.dataset=precomputed", f"data.path={out}", nproc=2, launcher_flags=cp2)
    _assert_same_steps(_steps(tmp_path / "fly"), _steps(tmp_path / "pre_run"), rel=1e-6)
    assert _start_event(tmp_path / "fly")["frozen_bytes"]["frozen_text"] > 0
    assert _start_event(tmp_path / "pre_run")["frozen_bytes"] == {"first_stage": 0, "frozen_text": 0}


def test_a_killed_precompute_finishes_on_a_rerun_without_redoing_its_shards(tmp_path):
    """Shards of 1 clip, slowed to 0.4 s each, on 2 data-parallel ranks; killed (SIGKILL to the whole process
    group) once 3 shards are on disk, then rerun: the finished shards are not written again (same mtime), the rest
    are, the bar starts from the clips already done, and every tensor equals a clean precompute's."""
    out, clean = tmp_path / "pre", tmp_path / "clean"
    extra = [*VAE, "data.num_samples=12", "precompute.shard_size=1"]
    flags = ["--cp-size", "1", "--model-parallel-size", "1"]
    slow = [*extra, f"precompute.output_dir={out}", "debug.step_sleep_s=0.4"]
    cmd = job_cmd(tmp_path, "p", *slow, command="precompute", nproc=2, launcher_flags=flags)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, start_new_session=True, **quiet)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.safetensors"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the precompute ended before 3 shards"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert 3 <= len(done) < 12 and not json.loads((out / "index.json").read_text())["complete"]
    r = launch(
        tmp_path, "p", *extra, f"precompute.output_dir={out}", command="precompute", nproc=2, launcher_flags=flags
    )
    assert f"{len(done)}/12" in r.stderr  # the progress bar resumes at the finished clips
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # not redone
    assert len(list(out.glob("shard-*.safetensors"))) == 12 and not list(out.glob("*.tmp*"))
    assert json.loads((out / "index.json").read_text())["complete"]
    launch(tmp_path, "c", *extra, f"precompute.output_dir={clean}", command="precompute", nproc=2, launcher_flags=flags)
    for k in range(12):
        a, b = load_file(str(out / f"shard-{k:06d}.safetensors")), load_file(str(clean / f"shard-{k:06d}.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a), k
