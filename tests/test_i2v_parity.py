# Image-to-video conditioning under every layout, in float64: the image latents as the job builds them
# (launch/job/image_cond.py: the noised first frame encoded only on the rank holding latent frame 0, zeros on the
# others, no communication) make the parallelized model's output, every gradient, the clipped gradients and the
# parameters after an AdamW step equal to one process building them for the whole batch (tests/test_parallelize.py's
# check_layout), with the pixel stage and with the CogVideoX VAE (the job's context-parallel first stage, whose
# holder encodes with its own stage).
from types import SimpleNamespace

import pytest
import torch
from distributed_helpers import run_ranks
from test_parallelize import H, T, W, check_layout

from cpdit.first_stage import PixelStage, VAEStage
from launch.job.image_cond import micro_batch_image_latents
from parallel.parallelize import Parallelized
from parallel.vae_stage import ContextParallelVAE


def _stage(kind):
    if kind == "pixel":
        return PixelStage()
    from cpdit.vae import VAE_PRESETS, CogVideoXVAE

    torch.manual_seed(0)  # the same random VAE on every rank
    return VAEStage(CogVideoXVAE(VAE_PRESETS["tiny"]).double())


def _fake_run(dims, rank, parallel, dropout, noise):
    """What micro_batch_image_latents reads of a run."""
    train = SimpleNamespace(seed=0, image_dropout=dropout, image_noise=noise)
    return SimpleNamespace(
        dims=dims, env=SimpleNamespace(rank=rank), cfg=SimpleNamespace(train=train), parallel=parallel, device="cpu"
    )


def image_inputs(kind, dropout=0.3, noise="step"):
    """check_layout's hook: x (the noisy latents, B = dp x batch) -> [x | image latents] of one process for every
    data-parallel replica's draws, and this rank's own [x | image latents] from its parallelized model."""
    stage = _stage(kind)
    sf, C = stage.spatial_factor, stage.latent_channels

    def build(x, dims, rank, per_rank):
        x = x[:, :, :C]  # the noisy latents; the image latents fill the other half of in_channels
        gen = torch.Generator().manual_seed(7)
        video = torch.rand(x.shape[0], 2, 3, H * sf, W * sf, generator=gen, dtype=torch.float64) * 2 - 1
        one = SimpleNamespace(frames_per_patch=1, sequence=SimpleNamespace(frames=_all_frames))
        parts = []
        for d in range(dims.dp):  # replica d's samples with replica d's draws (a rank of that replica)
            r = next(r for r in range(dims.world_size) if dims.dp_rank(r) == d)
            run = _fake_run(dims, r, Parallelized(dims, None, one, stage), dropout, noise)
            mine, ids = video[d * per_rank : (d + 1) * per_rank], list(range(d * per_rank, (d + 1) * per_rank))
            parts.append(micro_batch_image_latents(run, mine, (per_rank, T, C, H, W), 0, 0, ids))
        full = torch.cat([x, torch.cat(parts).to(x)], dim=2)

        def mine(model, mesh):
            d = dims.dp_rank(rank)
            cp_stage = ContextParallelVAE(stage, mesh.get_group("cp")) if kind == "vae" and dims.cp > 1 else stage
            run = _fake_run(dims, rank, Parallelized(dims, mesh, model, cp_stage), dropout, noise)
            shape, ids = (per_rank, T, C, H, W), list(range(d * per_rank, (d + 1) * per_rank))
            img = micro_batch_image_latents(run, video[d * per_rank : (d + 1) * per_rank], shape, 0, 0, ids).to(x)
            return torch.cat([x[d * per_rank : (d + 1) * per_rank], img], dim=2)

        return full, mine

    return build


def _all_frames(n):
    return SimpleNamespace(frame_ids=lambda device: torch.arange(n))


def _four(rank, world):
    for kind, variant in (("pixel", "i2v-pixel"), ("vae", "5b-i2v")):
        check_layout(rank, world, cp=2, tp=2, variant=variant, image_inputs=image_inputs(kind))
    check_layout(rank, world, cp=2, tp=2, variant="5b-i2v", layout="zigzag", image_inputs=image_inputs("vae"))
    # train.image_noise=clip (each clip's own pixel noise, what the latent cache keeps)
    check_layout(rank, world, cp=2, tp=2, variant="5b-i2v", image_inputs=image_inputs("vae", noise="clip"))
    check_layout(
        rank, world, cp=4, tp=1, ulysses=2, strategy="usp", variant="i2v-pixel", image_inputs=image_inputs("pixel")
    )


def _eight(rank, world):  # dp=2 x cp=2 x tp=2: each replica's own draws
    check_layout(rank, world, cp=2, tp=2, variant="5b-i2v", image_inputs=image_inputs("vae"))
    check_layout(
        rank, world, cp=4, tp=2, ulysses=2, strategy="usp", variant="i2v-pixel", image_inputs=image_inputs("pixel")
    )


@pytest.mark.parametrize("world, fn", [(4, _four), pytest.param(8, _eight, marks=pytest.mark.slow)], ids=["4", "8"])
def test_image_conditioning_parity(tmp_path, world, fn):
    run_ranks(fn, world, tmp_path, timeout=600)


def test_the_reference_holds_the_image_at_frame_0():
    """The hook's one-process input: the noisy latents, then the image at latent frame 0 and zeros after it."""
    from parallel.dims import ParallelDims

    x = torch.randn(1, T, 6, H, W, dtype=torch.float64)
    full, _ = image_inputs("pixel", dropout=0.0)(x, ParallelDims(1), 0, 1)
    assert full.shape == (1, T, 6, H, W) and torch.equal(full[:, :, :3], x[:, :, :3])
    assert full[:, 0, 3:].abs().sum() > 0 and not full[:, 1:, 3:].any()
