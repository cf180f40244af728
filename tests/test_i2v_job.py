# Image-to-video training end to end (cpdit/image_cond.py, launch/job/image_cond.py): a tiny image-conditioned
# CogVideoX (in_channels = 2 x the first stage's channels) trained by real jobs. The 4-rank job (cp=2 x tp=2, FSDP2,
# zigzag) takes the single-process job's steps with the pixel stage and with the VAE stage (whose context-parallel
# encode gives the clip's latents; only the rank holding latent frame 0 encodes the noised first frames, the other
# gets zeros), and the image latents reach the model (dropping them all changes the loss). A checkpoint resumes
# exactly under another layout.
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from job_helpers import launch, losses

from cpdit.image_cond import draw_image_noise, draw_keep, image_latents, noised_first_frame

pytestmark = pytest.mark.slow  # real cpdit-launch jobs

I2V = [
    "model.in_channels=6",
    "model.out_channels=3",
    "model.pos_embedding=rope",
    "data.num_samples=8",
    "data.batch_size=4",
    "train.steps=2",
    "optim.lr=3e-3",
    "sample.at_end=false",
    "logging.wandb=false",
]
VAE = [
    "first_stage.kind=vae",
    "first_stage.preset=tiny",
    "data.num_frames=9",
    "model.in_channels=8",
    "model.out_channels=4",
]
SINGLE = ["parallel.cp_size=1", "parallel.model_parallel_size=1"]


def test_recipe():
    """sigma = exp(N(-3, 0.5)); the image at latent frame 0, zeros after it and where dropped."""
    sigmas = torch.stack([draw_image_noise(torch.Generator().manual_seed(i), (3, 4, 4))[0] for i in range(4000)])
    assert sigmas.log().mean().item() == pytest.approx(-3.0, abs=0.05)
    assert sigmas.log().std().item() == pytest.approx(0.5, abs=0.05)
    assert all(draw_keep(torch.Generator().manual_seed(i), 1.0).item() is False for i in range(5))
    assert all(draw_keep(torch.Generator().manual_seed(i), 0.0).item() is True for i in range(5))
    video = torch.randn(2, 5, 3, 4, 4)
    noisy = noised_first_frame(video, torch.tensor([0.0, 1.0]), torch.ones(2, 1, 3, 4, 4))
    assert torch.equal(noisy[0], video[0, :1]) and torch.equal(noisy[1], video[1, :1] + 1)
    lat = image_latents(noisy, 3, torch.tensor([True, False]))
    assert lat.shape == (2, 3, 3, 4, 4) and torch.equal(lat[0, 0], noisy[0, 0])
    assert not lat[0, 1:].any() and not lat[1].any()


def _steps(run_dir):
    _, rows = losses(run_dir)
    return {r["step"]: r for r in rows if "loss" in r and "event" not in r}


@pytest.mark.parametrize("stage", [[], VAE], ids=["pixel", "vae"])
def test_i2v_job_matches_single_process(tmp_path, stage):
    launch(tmp_path, "single", *I2V, *stage, *SINGLE, nproc=1)
    launch(tmp_path, "cp2tp2", *I2V, *stage, "parallel.layout=zigzag")
    ref, got = _steps(tmp_path / "single"), _steps(tmp_path / "cp2tp2")
    assert sorted(ref) == sorted(got) == [1, 2]
    for step, tol in ((1, 2e-5), (2, 1e-3)):  # fp32, other reduction orders
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=tol), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=tol), step
    # the image latents reach the model: without them (all dropped) the gradients differ (not the losses yet:
    # adaLN-zero starts from a zero output, and the first step's warm-up lr is 0)
    launch(tmp_path, "dropped", *I2V, *stage, *SINGLE, "train.image_dropout=1.0", nproc=1)
    dropped = _steps(tmp_path / "dropped")
    for step in (1, 2):
        assert dropped[step]["grad_norm"] != pytest.approx(ref[step]["grad_norm"], rel=1e-3), step


def _images(tmp, n=2, size=16):
    """Conditioning images: a coloured square on grey, at different places."""
    paths = []
    for i in range(n):
        img = np.full((size, size, 3), 128, np.uint8)
        img[2 + 4 * i : 8 + 4 * i, 3:9] = (230, 40 * i, 20)
        path = tmp / f"image{i}.png"
        imageio.imwrite(path, img)
        paths.append(str(path))
    return paths


def test_i2v_samples_from_images_equal_under_cp(tmp_path):
    """Train (1 process), then sample the same checkpoint from two images on 1 process and on 4 (cp=2 x tp=2): the
    videos agree (the image latents live on the rank holding frame 0), and they depend on the image."""
    images = _images(tmp_path)
    prompts = "sample.prompts=[a shape moving left,a shape moving left]"
    fast = ["train.steps=4", "optim.lr=3e-2", "optim.warmup_steps=0"]  # far enough from adaLN-zero's start
    launch(tmp_path, "run", *I2V, *SINGLE, *fast, nproc=1)
    sample = [prompts, f"sample.images=[{','.join(images)}]", "sample.num_steps=3"]
    launch(tmp_path, "run", *I2V, *SINGLE, *sample, command="sample", nproc=1)
    out = tmp_path / "run" / "samples"
    one = {p.name: np.stack(imageio.mimread(str(p))).astype(float) for p in out.rglob("*.mp4")}
    launch(tmp_path, "run", *I2V, *sample, command="sample")
    four = {p.name: np.stack(imageio.mimread(str(p))).astype(float) for p in out.rglob("*.mp4")}
    assert sorted(one) == sorted(four) and len(one) == 2
    for name in one:
        assert one[name].shape[0] == 8 and np.abs(one[name] - four[name]).mean() < 0.05, name  # measured: 0.0
    swapped = [prompts, f"sample.images=[{','.join(reversed(images))}]", "sample.num_steps=3"]
    launch(tmp_path, "run", *I2V, *SINGLE, *swapped, command="sample", nproc=1)
    other = {p.name: np.stack(imageio.mimread(str(p))).astype(float) for p in out.rglob("*.mp4")}
    for name in one:  # the same prompt and noise from the other image: another video
        assert np.abs(one[name] - other[name]).mean() > 0.25, name  # measured: 0.58 and more (4 steps of training)


def test_i2v_checkpoint_resumes_exactly_under_another_layout(tmp_path):
    """An image-to-video run (the I2V dataset) checkpointed at step 2 on cp=2 x tp=2 resumes in one process: the
    state it holds after the resume equals the checkpoint bit for bit and steps 3-4 give the uninterrupted run's
    losses (the image noise and dropout draws are per sample, not per layout)."""
    import shutil

    from safetensors.torch import load_file

    from launch.job.checkpoint import checkpoint_dir, read_full_state

    common = [
        *I2V,
        "data.dataset=synthetic_i2v",
        "checkpoint.every=2",
        "train.export=false",
        "optim.warmup_steps=1",
        "optim.decay_steps=4",
        "train.image_dropout=0.25",
    ]
    launch(tmp_path, "reference", *common, "train.steps=4")
    launch(tmp_path, "first", *common, "train.steps=2")
    src = checkpoint_dir(tmp_path / "first" / "checkpoints", 2)
    shutil.copytree(src, checkpoint_dir(tmp_path / "second" / "checkpoints", 2))
    launch(tmp_path, "second", *common, *SINGLE, "train.steps=4", "debug.dump_resumed_state=true", nproc=1)
    saved, loaded = read_full_state(src), load_file(str(tmp_path / "second" / "resumed_state.safetensors"))
    assert set(saved) == set(loaded) and any(k.startswith("optim.state.") for k in saved)
    for key in sorted(saved):
        assert torch.equal(loaded[key], saved[key]), key
    ref, got = _steps(tmp_path / "reference"), _steps(tmp_path / "second")
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step  # fp32, other layouts


def test_i2v_latent_cache_equals_the_run_without_it_and_resumes_under_another_layout(tmp_path):
    """train.image_noise=clip: each clip's first frame is noised once (diffusers' I2V fine-tuning recipe), so the
    latent cache keeps its posterior beside the clip's. 4 clips in batches of 2: steps 3-4 are the second epoch, read
    from the cache (both posteriors), and a cp=2 x tp=2 run with the cache takes the uncached run's steps; resumed at
    step 2 in one process (another layout, the cp run's entries), it still does."""
    import shutil

    from safetensors.torch import load_file

    from launch.job.checkpoint import checkpoint_dir

    common = [*I2V, *VAE, "train.image_noise=clip", "data.num_samples=4", "data.batch_size=2", "train.export=false"]
    common += ["train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1", "train.image_dropout=0.25"]
    cache = f"data.latent_cache_dir={tmp_path / 'latents'}"
    launch(tmp_path, "plain", *common)
    launch(tmp_path, "cached", *common, cache)
    ref, got = _steps(tmp_path / "plain"), _steps(tmp_path / "cached")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for step in ref:  # the same computation, the posteriors read back bit for bit
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-6), step
    assert [got[s]["latent_cache_hits"] for s in (1, 2, 3, 4)] == [0, 0, 2, 4]
    entries = sorted((tmp_path / "latents").glob("*.safetensors"))
    assert len(entries) == 4
    entry = load_file(str(entries[0]))
    assert set(entry) == {"mean", "logvar", "image_mean", "image_logvar"}
    assert entry["image_mean"].shape[1] == 1 and entry["image_mean"].shape[0] == entry["mean"].shape[0]
    # resumed under another layout from the cached run's checkpoint, every clip a hit
    shutil.copytree(
        checkpoint_dir(tmp_path / "cached" / "checkpoints", 2), checkpoint_dir(tmp_path / "resumed" / "checkpoints", 2)
    )
    launch(tmp_path, "resumed", *common, *SINGLE, cache, nproc=1)
    resumed = _steps(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and [resumed[s]["latent_cache_hits"] for s in (3, 4)] == [2, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step  # fp32, other layout
        assert resumed[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-3), step
    # the knob matters: noised anew each step, the same clips give other gradients from step 2 on
    launch(tmp_path, "per_step", *[c for c in common if c != "train.image_noise=clip"], "train.steps=2")
    per_step = _steps(tmp_path / "per_step")
    assert per_step[2]["grad_norm"] != pytest.approx(ref[2]["grad_norm"], rel=1e-3)
