# A CogVideoX 1.5-shaped job (temporal patches of 2 latent frames, RoPE on the sliced grid) end to end: 5 frames
# get one leading copy of frame 0 (6 latent frames, 3 patch-frames: 2 + 1 over cp=2); the 4-rank job (cp=2 x tp=2,
# FSDP2) takes the single-process job's steps, and sampling drops the padding frame before decoding.
import imageio.v2 as imageio
import pytest
import torch
from job_helpers import launch, losses

from cpdit.models.patch import pad_leading_frames, patch_frame_padding

pytestmark = pytest.mark.slow  # real cpdit-launch jobs

V15 = [
    "model.pos_embedding=rope",
    "model.patch_size_t=2",
    "data.num_frames=5",
    "data.num_samples=8",
    "data.batch_size=4",
    "train.steps=2",
    "optim.lr=3e-3",
    "logging.wandb=false",
]


def test_padding_rule():
    """diffusers' 1.5 pipelines and CogVideo's 1.5 fine-tuning: copies of frame 0 in front up to a multiple."""
    assert [patch_frame_padding(t, 2) for t in (1, 2, 13, 21, 22)] == [1, 0, 1, 1, 0]
    assert patch_frame_padding(13, 1) == 0
    x = torch.arange(3.0).view(1, 3, 1)
    assert pad_leading_frames(x, 1).flatten().tolist() == [0.0, 0.0, 1.0, 2.0]
    assert pad_leading_frames(x, 0) is x


def test_cogvideox15_job_matches_single_process_and_samples(tmp_path):
    launch(tmp_path, "single", *V15, "parallel.cp_size=1", "parallel.model_parallel_size=1", nproc=1)
    launch(
        tmp_path,
        "cp2tp2",
        *V15,
        "sample.at_end=true",
        "sample.num_steps=2",
        "sample.prompts=[a red circle moving left]",
        "parallel.layout=zigzag",
    )
    _, ref = losses(tmp_path / "single")
    _, got = losses(tmp_path / "cp2tp2")
    ref = {r["step"]: r for r in ref if "loss" in r and "event" not in r}
    got = {r["step"]: r for r in got if "loss" in r and "event" not in r}
    assert sorted(ref) == sorted(got) == [1, 2]
    for step, tol in ((1, 2e-5), (2, 1e-3)):  # fp32, other reduction orders
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=tol), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=tol), step
    (mp4,) = (tmp_path / "cp2tp2" / "samples").glob("*.mp4")
    assert len(imageio.mimread(str(mp4))) == 5  # the 6 sampled latent frames less the leading copy
