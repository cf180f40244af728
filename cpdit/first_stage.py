# The first stage (video autoencoder) seam of the diffusion model. The training and sampling jobs see videos
# only through it: `encode` (pixels -> latents) before noising, `decode` (latents -> pixels) after sampling.
# The built-in pixel stage needs no weights (the default job); the CogVideoX VAE plugs in here.
from __future__ import annotations

from typing import Protocol

import torch


class FirstStage(Protocol):
    latent_channels: int
    temporal_factor: int  # pixel frames -> latent frames: 1 + (F - 1) / temporal_factor
    spatial_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [-1, 1] -> (B, T, C, H/s, W/s) latents, scaled for the diffusion model."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of encode, back to (B, F, 3, H, W) in [-1, 1]."""


class PixelStage:
    """Identity first stage: the diffusion model works on RGB frames directly."""

    latent_channels = 3
    temporal_factor = 1
    spatial_factor = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)
