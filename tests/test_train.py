# The main job end to end with real torchrun processes (4 gloo ranks, cp=2 x tp=2): run directory contents, NaN
# guard, crash during save, resume equals an uninterrupted run, resume under another layout, sampling job.
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from job_helpers import launch as launch_job
from job_helpers import losses
from safetensors.torch import load_file
from t5_helpers import make_tiny_t5

from cpdit.text import T5TextEncoder
from launch.config import load_config
from launch.job.checkpoint import complete_checkpoints, find_resume
from launch.job.data import build_dataset

pytestmark = pytest.mark.slow  # real cpdit-launch jobs

# short runs; the NaN guard fires at step index 3 in every run, so all trajectories agree
COMMON = [
    "train.steps=6",
    "checkpoint.every=2",
    "checkpoint.keep_last=3",
    "train.log_every=1",
    "data.num_samples=16",
    "sample.at_end=false",
    "train.export=false",
    "debug.nan_at_step=3",
    "optim.warmup_steps=2",
]


def launch(tmp, name, *extra, command="train", check=True):
    return launch_job(tmp, name, *COMMON, *extra, command=command, check=check)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    launch(
        tmp,
        "a",
        "train.export=true",
        "sample.at_end=true",
        "sample.num_steps=3",
        "sample.prompts=[a red circle moving left]",
    )
    return tmp


def test_run_directory(uninterrupted):
    run = uninterrupted / "a"
    by_step, rows = losses(run)
    assert sorted(by_step) == [1, 2, 3, 5, 6] and all(v == v and v > 0 for v in by_step.values())
    skipped = [r for r in rows if r.get("event") == "skipped_step"]
    assert len(skipped) == 1 and skipped[0]["step"] == 4  # NaN guard: step skipped, counted, run goes on
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
    assert (run / "config.yaml").is_file() and (run / "loss.png").stat().st_size > 1000
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((run / "wandb").glob("offline-run-*/files/media/videos/samples_*.mp4"))  # the samples reach wandb
    assert "api_key" not in (run / "config.yaml").read_text()
    mp4 = next((run / "samples").glob("*.mp4"))
    frames = imageio.mimread(str(mp4))
    assert len(frames) == 8 and frames[0].shape[2] == 3  # playable: decoded back, 8 frames
    assert len(imageio.mimread(str(mp4.with_suffix(".gif")))) == 8 and mp4.with_suffix(".png").is_file()
    sd = load_file(str(run / "export" / "model.safetensors"))
    assert "blocks.0.attn.to_q.weight" in sd
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.CogVideoXTransformer3DModel.from_pretrained(str(run / "export" / "diffusers"))
    assert model.config.num_layers == 2


def test_crash_during_save_then_resume_equals_uninterrupted(uninterrupted):
    tmp = uninterrupted
    r = launch(tmp, "b", "debug.fail_save_at_step=4", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    ckpts = tmp / "b" / "checkpoints"
    assert (ckpts / "step_00000004.tmp").is_dir()  # the interrupted save is left incomplete...
    assert find_resume(ckpts, "auto").name == "step_00000002"  # ...and the previous one is what resumes
    launch(tmp, "b")  # resume=auto
    a, _ = losses(tmp / "a")
    b, rows = losses(tmp / "b")
    assert any(row.get("event") == "resume" and row["step"] == 2 for row in rows)
    for step in (3, 5, 6):  # after resuming, the same losses as the uninterrupted run (same bits in, same math)
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)
    assert not (ckpts / "step_00000004.tmp").exists()


def test_worker_failure_then_resume(uninterrupted):
    tmp = uninterrupted
    r = launch(tmp, "c", "debug.fail_at_step=3", "debug.fail_rank=2", check=False)
    assert r.returncode == 1 and "injected failure at step 3 on rank 2" in r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]  # the launcher's summary names the root cause, not a peer's gloo error
    assert last.startswith("cpdit-launch: the job failed: rank 2 raised RuntimeError: injected failure at step 3"), last
    launch(tmp, "c")
    a, _ = losses(tmp / "a")
    c, _ = losses(tmp / "c")
    assert c[6] == pytest.approx(a[6], rel=1e-6)


def test_resume_under_another_layout(uninterrupted):
    tmp = uninterrupted
    shutil.copytree(tmp / "a" / "checkpoints" / "step_00000002", tmp / "d" / "checkpoints" / "step_00000002")
    launch(tmp, "d", "--cp-size", "4", "--model-parallel-size", "1")  # saved as cp=2 x tp=2, resumed as cp=4
    a, _ = losses(tmp / "a")
    d, _ = losses(tmp / "d")
    for step in (3, 5, 6):  # fp32, other reduction order: close, not bitwise
        assert d[step] == pytest.approx(a[step], rel=2e-3), (step, a, d)


def test_sample_job_loads_the_last_checkpoint(uninterrupted):
    r = launch(
        uninterrupted,
        "a",
        "sample.num_steps=2",
        "sample.sampler=ddim",
        "sample.prompts=[a blue square moving down,a green circle moving up]",
        command="sample",
    )
    out = uninterrupted / "a" / "samples" / "step_00000006"
    assert sorted(p.name for p in out.glob("*.mp4")) == [
        "000_a_blue_square_moving_down.mp4",
        "001_a_green_circle_moving_up.mp4",
    ]
    assert "cpdit sample: wrote" in r.stdout
    d = load_config(uninterrupted / "a" / "config.yaml").data
    for video in out.glob("*.mp4"):  # the configured clip, every frame, and not a constant picture
        frames = np.stack(imageio.mimread(str(video)))
        scale = -(-128 // max(d.height, d.width))  # launch/job/media.py upscales small clips to 128 pixels
        assert frames.shape == (d.num_frames, d.height * scale, d.width * scale, 3), (video.name, frames.shape)
        assert frames.std() > 1, video.name


def test_t5_text_encoder_job(tmp_path):
    pytest.importorskip("transformers")
    make_tiny_t5(tmp_path / "t5model")  # not the run directory: wandb writes symlinks there
    # 2 steps of 2 clips (dp=1) over 4 clips: every clip's caption is encoded once, through the cache
    launch(
        tmp_path,
        "t5",
        "train.steps=2",
        "text.encoder=t5",
        f"text.path={tmp_path / 't5model'}",
        "data.num_samples=4",
        f"text.cache_dir={tmp_path / 'cache'}",
        "model.text_embed_dim=16",
        "train.text_max_length=12",
    )
    by_step, _ = losses(tmp_path / "t5")
    assert sorted(by_step) == [1, 2]
    cfg = load_config(tmp_path / "t5" / "config.yaml")
    captions = {build_dataset(cfg, cfg.train.seed)[i][1] for i in range(4)}
    keys = {T5TextEncoder(str(tmp_path / "t5model"), max_length=12)._key(c) for c in captions}
    assert {f.stem for f in (tmp_path / "cache").glob("*.safetensors")} == keys


def test_lora_finetune_from_diffusers_export(uninterrupted):
    """Fine-tune the exported (diffusers layout) model with LoRA: only adapters train, exported for diffusers."""
    tmp = uninterrupted
    pretrained = tmp / "a" / "export" / "diffusers"
    launch(tmp, "lora", "train.steps=2", f"model.pretrained={pretrained}", "model.lora_rank=4", "train.export=true")
    out = tmp / "lora" / "export" / "lora"
    adapters = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in adapters
    assert "transformer.transformer_blocks.1.attn1.to_out.0.lora_B.weight" in adapters
    base = load_file(str(tmp / "lora" / "export" / "model.safetensors"))
    original = load_file(str(tmp / "a" / "export" / "model.safetensors"))
    assert all(torch.equal(base[k], original[k]) for k in original)  # the base stayed frozen
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # the adapters trained


def test_a_failing_final_step_loses_nothing(tmp_path):
    """The loss plot fails (its path is a directory): the job exits 1 naming it, but the final checkpoint, the
    samples and the export are all written."""
    run = tmp_path / "pf"
    (run / "loss.png").mkdir(parents=True)
    r = launch(
        tmp_path,
        "pf",
        "train.steps=2",
        "sample.at_end=true",
        "train.export=true",
        "sample.num_steps=2",
        "sample.prompts=[a red circle moving left]",
        "debug.nan_at_step=null",
        check=False,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "ERROR in loss plot" in r.stderr and "1 of the final steps" in r.stderr
    assert [p.name for p in complete_checkpoints(run / "checkpoints")][-1] == "step_00000002"
    assert list((run / "samples").glob("*.mp4")) and (run / "export" / "model.safetensors").is_file()


SAMPLE_AT_END = [
    "train.steps=2",
    "sample.at_end=true",
    "train.export=true",
    "sample.num_steps=2",
    "sample.prompts=[a red circle moving left,a blue square moving up]",
    "debug.nan_at_step=null",
    "debug.fail_rank=1",
    "dist.timeout_s=3000",
]  # a rank left waiting would outlast the test


def test_sampling_that_fails_on_one_rank_stops_every_rank_at_once(tmp_path):
    """Rank 1 fails preparing its first prompt (its own work): every rank stops sampling at that point together (no
    rank waits for dist.timeout_s in a collective), and the export after it still runs on every rank."""
    r = launch_job(tmp_path, "sf", *COMMON, *SAMPLE_AT_END, "debug.fail_sample=prompt", check=False, timeout=240)
    assert r.returncode == 1, r.stderr[-3000:]
    stopped = "ERROR in samples: SamplingFailed: preparing prompt 0 of the replica on rank"
    assert f"{stopped} 1: RuntimeError: injected" in r.stderr and f"{stopped} 0: another rank failed" in r.stderr
    assert "1 of the final steps" in r.stderr and (tmp_path / "sf" / "export" / "model.safetensors").is_file()
    assert [p.name for p in complete_checkpoints(tmp_path / "sf" / "checkpoints")][-1] == "step_00000002"


def test_a_rank_failing_inside_sampling_collectives_ends_the_job(tmp_path):
    """Rank 1 fails in its first sampling forward, where its cp x tp peers wait for it inside collectives: it does
    not go on to the export's collectives (which would leave everyone waiting for dist.timeout_s) but ends, and the
    launcher's last line names it."""
    r = launch_job(tmp_path, "cf", *COMMON, *SAMPLE_AT_END, "debug.fail_sample=forward", check=False, timeout=240)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "cpdit-launch: the job failed: rank 1 raised CollectiveFailed: sampling prompt 0 on rank 1"
        ": RuntimeError: injected failure in a sampling forward"
    ), last
    assert [p.name for p in complete_checkpoints(tmp_path / "cf" / "checkpoints")][-1] == "step_00000002"


def test_a_tampered_checkpoint_is_refused_and_runs_nothing(uninterrupted, tmp_path):
    """A copy of a real checkpoint whose .metadata would run code through a dotted pickle name, with its manifest
    recomputed (whoever can write the shards can write the manifest): every rank refuses it, nothing runs."""
    import hashlib
    import json
    import pickle

    from test_checkpoint_safety import Touch, _nested_pickle_via_dotted_name

    bad = tmp_path / "copy" / "step_00000006"
    shutil.copytree(uninterrupted / "a" / "checkpoints" / "step_00000006", bad)
    marker = tmp_path / "ran"
    (bad / ".metadata").write_bytes(_nested_pickle_via_dotted_name(pickle.dumps(Touch(marker))))
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in bad.iterdir()
        if p.name not in ("manifest.json", "meta.json")
    }
    (bad / "manifest.json").write_text(json.dumps({"files": files}))
    r = launch(uninterrupted, "tampered", f"checkpoint.resume={bad}", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "cpdit unpickles DCP's metadata classes only" in r.stderr and str(bad / ".metadata") in r.stderr
    assert not marker.exists()
