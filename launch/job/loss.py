# The diffusion objective of one micro-batch (CogVideoX's v-prediction on zero-SNR noise levels): the first stage's
# latents, the step's random draws (RNG policy: ParallelDims.draw_seed), the forward on this rank's frames and its
# share of the step's mean loss (a mean over clips, each clip's loss the mean over its own tokens).
from __future__ import annotations

import torch

from cpdit.diffusion import add_noise, per_frame_timesteps, sample_timesteps, v_loss_terms
from cpdit.models.patch import pad_leading_frames, patch_frame_padding
from launch.job.data import MicroBatch
from launch.job.image_cond import holds_image, image_moments, micro_batch_image_latents
from parallel.dynamic_cp import sub_group_index
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


def micro_batch_loss(run, step: int, micro: int, batch: MicroBatch) -> torch.Tensor:
    """This rank's share of the step's mean loss: the sum over its clips (its sub-group's, under a smaller cp degree)
    of each clip's loss over its own frames divided by the clip's element count, times dp / the step's clip count.
    Summed over cp and averaged over dp (FSDP or the plain all-reduce) it is the mean over the step's clips of each
    clip's mean loss, so every clip counts the same whatever its bucket. Runs in run.parallel.cp_degree(batch.cp)."""
    cfg, device, dims = run.cfg, run.device, run.dims
    video, captions, ids, cached = batch.video, batch.captions, batch.ids, None
    # the first stage's posterior sample: one generator per micro-step (its own stream of seeds)
    seed = dims.draw_seed(cfg.train.seed, run.env.rank, step, FIRST_STAGE_STREAM + micro)
    gen = torch.Generator().manual_seed(seed)
    PROGRESS.enter("first stage")
    if isinstance(video, dict):  # data.dataset=precomputed: the posteriors (and text embeddings) as computed before
        cached, video = {k: t.to(device) for k, t in video.items()}, None
    elif run.cache is not None:
        cached = run.cache.entries(ids, device, lambda: cache_entries(run, video, ids))
    if cached is not None:
        x0 = run.first_stage.latents(cached["mean"], cached["logvar"], gen).float()
    else:  # the whole micro-batch over the first stage's group, whatever the model's degree
        x0 = run.first_stage.encode(video.to(device), gen).float()  # (B, T, C, h, w) latents
    rows = slice(0, x0.shape[0])
    if batch.cp is not None and batch.cp != dims.cp:  # this rank's sub-group takes its share of the clips
        k, groups = sub_group_index(dims, run.env.rank, batch.cp)
        rows = slice(k * x0.shape[0] // groups, (k + 1) * x0.shape[0] // groups)
        x0, ids, captions = x0[rows], ids[rows], captions[rows]
        video = video[rows] if video is not None else None
        cached = {key: t[rows] for key, t in cached.items()} if cached is not None else None
    first = batch.first + rows.start  # the clip's index among its group's clips of the step: its draws' seeds
    image = None
    if run.image_conditioned:  # [noisy | image] latents in: the noised first frame at latent frame 0
        moments = (cached["image_mean"], cached["image_logvar"]) if cached and "image_mean" in cached else None
        image = micro_batch_image_latents(run, video, x0.shape, step, first, ids, moments)
    # a model patching frames_per_patch latent frames together (CogVideoX 1.5): copies of frame 0 in front
    pad = patch_frame_padding(x0.shape[1], run.modules.dit.frames_per_patch)
    x0 = pad_leading_frames(x0, pad)
    idx, noise, keep = diffusion_draws(x0.shape, run.schedule.num_idx, run, step, first, run.frame_causal)
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
    per_clip = err.flatten(1).sum(1) / x0[0].numel()  # (B,): this rank's frames' part of each clip's mean
    return per_clip.sum() * (dims.dp / batch.step_samples)
