# The image latents of a micro-batch for an image-to-video model (cpdit/image_cond.py's recipe), built where they
# are used: only the rank whose frames include latent frame 0 encodes the noised first frames (with its own first
# stage, no collective); every other rank of the cp group gets zeros, which its frames hold anyway, without any
# communication. Draws come from their own streams, per sample (accumulation and layouts change nothing): the
# dropout and the posterior sample from the step's, the pixel noise from the step's (train.image_noise=step) or from
# the clip's own (=clip: the same noise every epoch, so the latent cache can keep the noised image's posterior).
from __future__ import annotations

import torch

from cpdit.first_stage import latent_frames
from cpdit.image_cond import draw_image_noise, draw_keep, image_latents, noised_first_frame
from cpdit.seeding import generator

IMAGE_STREAM = 2 << 20  # draw indices at and above this seed the image conditioning of sample (index - IMAGE_STREAM)


def clip_noise(seed: int, ids: list[int], frame_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """train.image_noise=clip: the pixel noise of clips `ids`, sigma (B,) and noise (B, 1, 3, H, W), each clip's the
    same in every epoch, layout and run of this seed."""
    sigma, noise = zip(*(draw_image_noise(generator(seed, "image noise", i), frame_shape) for i in ids), strict=True)
    return torch.stack(sigma), torch.stack(noise)


def noised_image_moments(stage, seed: int, video: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """train.image_noise=clip: video (B, F, 3, H, W) of clips `ids` (on the stage's device) -> the posterior (mean,
    logvar), each (B, C, 1, h, w), of their first frames noised with each clip's own noise (what the latent cache and
    the precomputed directory keep). `stage`: one device's first stage, one sample at a time, as
    micro_batch_image_latents encodes them."""
    image = noised_first_frame(video, *clip_noise(seed, ids, video.shape[2:]))
    mean, logvar = zip(*(stage.moments(image[j : j + 1]) for j in range(len(ids))), strict=True)  # (B, 1, 3, H, W) in
    return torch.cat(mean), torch.cat(logvar)


def image_moments(run, video: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """noised_image_moments with this rank's own first stage (no collective)."""
    return noised_image_moments(run.parallel.local_first_stage, run.cfg.train.seed, video.to(run.device), ids)


def holds_image(run, video: torch.Tensor) -> bool:
    """Whether this rank's frames of the clip `video` (B, F, 3, H, W) include latent frame 0 (it encodes the image)."""
    return run.parallel.holds_first_frame(latent_frames(video.shape[1], run.first_stage.temporal_factor))


def micro_batch_image_latents(
    run,
    video: torch.Tensor,
    latent_shape: torch.Size,
    step: int,
    first: int,
    ids: list[int],
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """video (B, F, 3, H, W) of clips `ids` -> (B, T, C, h, w) image latents for latents of `latent_shape` (before
    padding). `moments`: the noised first frames' posterior (image_moments) from the latent cache; None: encoded
    here."""
    B, T = latent_shape[:2]
    dims, rank, train = run.dims, run.env.rank, run.cfg.train
    gens, sigma, noise, keep = [], [], [], []
    for j in range(B):
        g = torch.Generator().manual_seed(dims.draw_seed(train.seed, rank, step, IMAGE_STREAM + first + j))
        if train.image_noise == "step":
            s, n = draw_image_noise(g, video.shape[2:])
            sigma.append(s)
            noise.append(n)
        gens.append(g)
        keep.append(draw_keep(g, train.image_dropout))
    if not run.parallel.holds_first_frame(T):
        return torch.zeros(latent_shape, device=run.device)
    stage = run.parallel.local_first_stage
    if moments is None:
        pixel_noise = (
            (torch.stack(sigma), torch.stack(noise)) if sigma else clip_noise(train.seed, ids, video.shape[2:])
        )
        image = noised_first_frame(video.to(run.device), *pixel_noise)  # (B, 1, 3, H, W)
        encoded = [stage.encode(image[j : j + 1], gens[j]) for j in range(B)]  # each (1, 1, C, h, w)
    else:  # the clip's noised image's posterior from the cache, sampled with the step's draws as encode would
        mean, logvar = moments
        encoded = [stage.latents(mean[j : j + 1], logvar[j : j + 1], gens[j]) for j in range(B)]
    return image_latents(torch.cat(encoded).float(), T, torch.stack(keep).to(run.device))
