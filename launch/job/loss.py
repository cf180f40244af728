# The diffusion objective of one micro-batch (CogVideoX's v-prediction on zero-SNR noise levels): the first stage's
# latents, the step's random draws (RNG policy: ParallelDims.draw_seed), the forward on this rank's frames and its
# share of the replica's mean loss.
from __future__ import annotations

import time

import torch

from cpdit.diffusion import add_noise, per_frame_timesteps, sample_timesteps, v_loss_terms
from cpdit.models.patch import pad_leading_frames, patch_frame_padding
from launch.job.image_cond import holds_image, image_moments, micro_batch_image_latents
from parallel.progress import PROGRESS

FIRST_STAGE_STREAM = 1 << 20  # draw indices at and above this seed the first stage's posterior samples


def diffusion_draws(
    shape: torch.Size, num_idx: int, run, step: int, first: int, frame_causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timestep indices (B,) or per frame (B, T), noise (B, ...) and the caption keep mask (B,) of a micro-batch.
    Sample j draws from its own generator seeded by its index `first + j` in the step's accumulated batch, so
    k micro-steps of batch b draw exactly what one step of batch k*b draws (accumulation changes nothing)."""
    dims, rank, train = run.dims, run.env.rank, run.cfg.train
    dp_rank = dims.dp_rank(rank)
    idx, noise, keep = [], [], []
    for j in range(shape[0]):
        g = torch.Generator().manual_seed(dims.draw_seed(train.seed, rank, step, first + j))
        if frame_causal:  # a noise level per frame
            idx.append(per_frame_timesteps(1, shape[1], num_idx, dp_rank, dims.dp, g)[0])
        else:
            idx.append(sample_timesteps(1, num_idx, dp_rank, dims.dp, g)[0])
        noise.append(torch.randn(shape[1:], generator=g))
        keep.append(torch.rand((), generator=g) >= train.ucg_rate)  # classifier-free dropout of the caption
    return torch.stack(idx), torch.stack(noise), torch.stack(keep)


def cache_entries(run, video: torch.Tensor, ids: list[int]) -> dict[str, torch.Tensor]:
    """Collective (the first stage's group): the latent cache's entries of clips `ids` (launch/job/latent_cache.py);
    an image-to-video model's noised first frames only where they are used or written."""
    mean, logvar = run.first_stage.moments(video.to(run.device))  # each (B, C, T, h, w)
    out = {"mean": mean, "logvar": logvar}
    if run.image_conditioned and (run.cache.writer or holds_image(run, video)):
        out["image_mean"], out["image_logvar"] = image_moments(run, video, ids)
    return out


def micro_batch_loss(run, step: int, micro: int) -> tuple[torch.Tensor, float]:
    """(this rank's share of its replica's mean loss over the step's accumulated batch, data seconds). The share
    sums over cp to the replica's mean; FSDP (or the plain all-reduce) averages over dp."""
    cfg, device = run.cfg, run.device
    PROGRESS.enter("data")
    t_data = time.perf_counter()
    video, captions = run.batches.next()
    data_time = time.perf_counter() - t_data
    # the first stage's posterior sample: one generator per micro-step (its own stream of seeds)
    seed = run.dims.draw_seed(cfg.train.seed, run.env.rank, step, FIRST_STAGE_STREAM + micro)
    gen = torch.Generator().manual_seed(seed)
    PROGRESS.enter("first stage")
    ids, cached = run.batches.last_ids, None
    if isinstance(video, dict):  # data.dataset=precomputed: the posteriors (and text embeddings) as computed before
        cached, video = {k: t.to(device) for k, t in video.items()}, None
    elif run.cache is not None:
        cached = run.cache.entries(ids, device, lambda: cache_entries(run, video, ids))
    if cached is not None:
        x0 = run.first_stage.latents(cached["mean"], cached["logvar"], gen).float()
    else:
        x0 = run.first_stage.encode(video.to(device), gen).float()  # (B, T, C, h, w) latents
    B = x0.shape[0]
    image = None
    if run.image_conditioned:  # [noisy | image] latents in: the noised first frame at latent frame 0
        moments = (cached["image_mean"], cached["image_logvar"]) if cached and "image_mean" in cached else None
        image = micro_batch_image_latents(run, video, x0.shape, step, micro * B, ids, moments)
    # a model patching frames_per_patch latent frames together (CogVideoX 1.5): copies of frame 0 in front
    pad = patch_frame_padding(x0.shape[1], run.modules.dit.frames_per_patch)
    x0 = pad_leading_frames(x0, pad)
    idx, noise, keep = diffusion_draws(x0.shape, run.schedule.num_idx, run, step, micro * B, run.frame_causal)
    noise, keep = noise.to(device), keep.to(device)
    a = run.schedule.alpha(idx).to(device)  # (B,) or per frame (B, T)
    x_t = add_noise(x0, noise, a)
    PROGRESS.enter("forward")
    with run.autocast:
        text = cached["text"] if cached is not None and "text" in cached else run.modules.encode(captions)
        text = text * keep[:, None, None]
        x_in = x_t if image is None else torch.cat([x_t, pad_leading_frames(image, pad)], dim=2)
        v = run.modules.dit(x_in, text, idx.to(device).float(), return_local=True)  # (B, T_local, C, H, W)
    local = run.parallel.local_frames
    err = v_loss_terms(v.float(), local(x_t), local(x0), local(a) if a.dim() == 2 else a)
    return err.sum() / (x0[0].numel() * B * cfg.train.grad_accum), data_time
