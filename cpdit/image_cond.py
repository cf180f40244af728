# Image-to-video conditioning as CogVideoX trains its I2V models (SAT's noised image input, diffusers' I2V
# fine-tuning): the clip's first frame, noised in pixel space with sigma = exp(N(-3, 0.5)) per sample, is encoded by
# the first stage and placed at latent frame 0 with zeros after it; the model takes [noisy latents | image latents]
# on channels. With probability `dropout` a sample's image latents are all zeros (SAT's noised_image_dropout).
# The pixel noise is drawn anew each step (SAT) or once per clip (diffusers' I2V fine-tuning script, which encodes
# the noised image once before training; what a latent cache can keep): the same draws, from another generator.
from __future__ import annotations

import torch

LOG_SIGMA_MEAN, LOG_SIGMA_STD = -3.0, 0.5


def draw_image_noise(gen: torch.Generator, frame_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's pixel-noise draws, in this order from `gen`: sigma (), noise (1, 3, H, W)."""
    sigma = torch.exp(LOG_SIGMA_MEAN + LOG_SIGMA_STD * torch.randn((), generator=gen))
    return sigma, torch.randn((1, *frame_shape), generator=gen)


def draw_keep(gen: torch.Generator, dropout: float) -> torch.Tensor:
    """One sample's image dropout draw from `gen`: keep () (False: the image latents are zeros)."""
    return torch.rand((), generator=gen) >= dropout


def noised_first_frame(video: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """video (B, F, 3, H, W), sigma (B,), noise (B, 1, 3, H, W) -> the noised first frames (B, 1, 3, H, W)."""
    return video[:, :1] + sigma.to(video)[:, None, None, None, None] * noise.to(video)


def image_latents(first: torch.Tensor, frames: int, keep: torch.Tensor) -> torch.Tensor:
    """first (B, 1, C, h, w) encoded images -> (B, frames, C, h, w): frame 0 the image (zeros where not kept), zeros
    after it."""
    out = first.new_zeros((first.shape[0], frames, *first.shape[2:]))
    out[:, :1] = first * keep.to(first)[:, None, None, None, None]
    return out
