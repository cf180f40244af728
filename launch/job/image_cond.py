# The image latents of a micro-batch for an image-to-video model (cpdit/image_cond.py's recipe), built where they
# are used: only the rank whose frames include latent frame 0 encodes the noised first frames (with its own first
# stage, no collective); every other rank of the cp group gets zeros, which its frames hold anyway, without any
# communication. Draws come from their own stream, per sample (accumulation and layouts change nothing).
from __future__ import annotations

import torch

from cpdit.image_cond import draw_image_noise, image_latents, noised_first_frame

IMAGE_STREAM = 2 << 20  # draw indices at and above this seed the image conditioning of sample (index - IMAGE_STREAM)


def micro_batch_image_latents(run, video: torch.Tensor, latent_shape: torch.Size, step: int, first: int):
    """video (B, F, 3, H, W) -> (B, T, C, h, w) image latents for latents of `latent_shape` (before padding)."""
    B, T = latent_shape[:2]
    dims, rank, train = run.dims, run.env.rank, run.cfg.train
    gens, sigma, noise, keep = [], [], [], []
    for j in range(B):
        g = torch.Generator().manual_seed(dims.draw_seed(train.seed, rank, step, IMAGE_STREAM + first + j))
        s, n, k = draw_image_noise(g, video.shape[2:], train.image_dropout)
        gens.append(g)
        sigma.append(s)
        noise.append(n)
        keep.append(k)
    if not run.parallel.holds_first_frame(T):
        return torch.zeros(latent_shape, device=run.device)
    image = noised_first_frame(video.to(run.device), torch.stack(sigma), torch.stack(noise))  # (B, 1, 3, H, W)
    stage = run.parallel.local_first_stage
    encoded = torch.cat([stage.encode(image[j : j + 1], gens[j]) for j in range(B)]).float()  # (B, 1, C, h, w)
    return image_latents(encoded, T, torch.stack(keep).to(run.device))
