# The first stage (video autoencoder) seam of the diffusion model. The training and sampling jobs see videos
# only through it: `encode` (pixels -> latents) before noising, `decode` (latents -> pixels) after sampling.
# The built-in pixel stage needs no weights (the default job); the CogVideoX VAE plugs in here.
from __future__ import annotations

from typing import Protocol

import torch


def latent_frames(frames: int, temporal_factor: int) -> int:
    """Pixel frames -> latent frames: CogVideoX's rule, 1 + (F - 1) / temporal_factor (49 -> 13 at 4); the identity at
    factor 1. Whether the frames round-trip through a VAE is its config's check (cpdit/vae/config.py)."""
    return 1 + (frames - 1) // temporal_factor


class FirstStage(Protocol):
    latent_channels: int
    temporal_factor: int  # pixel frames -> latent frames: latent_frames(F, temporal_factor)
    spatial_factor: int

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, F, 3, H, W) in [-1, 1] -> (B, T, C, H/s, W/s) latents, scaled for the diffusion model (a posterior
        sample drawn with `generator`, identical on every rank that passes the same generator state)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of encode, back to (B, F, 3, H, W) in [-1, 1]."""


class PixelStage:
    """Identity first stage: the diffusion model works on RGB frames directly."""

    latent_channels = 3
    temporal_factor = 1
    spatial_factor = 1

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class VAEStage:
    """The CogVideoX VAE as first stage (frozen). `time` builds the time-axis seam for a clip of a given number of
    latent frames: the whole clip here (LocalTime) or its context-parallel piece (parallel/vae_stage.py)."""

    def __init__(self, vae, scale_factor: float | None = None, chunk_latents: int = 0, diffusers_batches: bool = False):
        self.vae = vae.requires_grad_(False).eval()
        c = vae.config
        self.latent_channels, self.temporal_factor, self.spatial_factor = (
            c.latent_channels,
            c.temporal_compression_ratio,
            c.spatial_factor,
        )
        self.scale = c.scaling_factor if scale_factor is None else scale_factor
        self.chunk = chunk_latents  # > 0: exact streaming over chunks of this many latent frames (bounded memory)
        self.diffusers = (
            diffusers_batches  # diffusers' batched encode/decode (statistics per batch; cpdit/vae/batched.py)
        )

    @torch.no_grad()
    def moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, 3, H, W) -> posterior (mean, logvar), each (B, C, T, h, w), unscaled (what a latent cache keeps)."""
        from cpdit.vae import LocalTime

        x = video.permute(0, 2, 1, 3, 4).to(next(self.vae.parameters()).dtype)  # (B, 3, F, H, W)
        if self.diffusers:
            post = self.vae.encode_diffusers(x)
        else:
            post = self.vae.encode_chunked(x, self.chunk) if self.chunk else self.vae.encode(x, LocalTime())
        return post.mean, post.logvar

    def latents(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A scaled posterior sample (the noise drawn for the whole clip: independent of how it was encoded)."""
        return sample_latents(mean, logvar, generator, self.scale)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents(*self.moments(video), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from cpdit.vae import LocalTime

        z = latents.permute(0, 2, 1, 3, 4).to(next(self.vae.parameters()).dtype) / self.scale
        if self.diffusers:
            out = self.vae.decode_diffusers(z)
        else:
            out = self.vae.decode_chunked(z, self.chunk) if self.chunk else self.vae.decode(z, LocalTime())
        return out.permute(0, 2, 1, 3, 4).clamp(-1, 1)


class PosteriorStage:
    """The first stage of a run that trains from precomputed posteriors (data.dataset=precomputed): it draws the
    scaled posterior sample as VAEStage does, from the VAE's config alone; the VAE's weights are not in memory, so it
    neither encodes nor decodes (sampling builds the VAE for its duration: launch/job/resident.py)."""

    def __init__(self, config, scale_factor: float | None = None):
        self.latent_channels, self.temporal_factor, self.spatial_factor = (
            config.latent_channels,
            config.temporal_compression_ratio,
            config.spatial_factor,
        )
        self.scale = config.scaling_factor if scale_factor is None else scale_factor

    def latents(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return sample_latents(mean, logvar, generator, self.scale)

    def _absent(self, *args, **kwargs):
        raise RuntimeError(
            "the VAE is not in memory when training from precomputed posteriors (data.dataset=precomputed); "
            "encoding and decoding happen only while sampling"
        )

    encode = moments = decode = _absent


def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None, scale: float
) -> torch.Tensor:
    """(B, C, T, h, w) posterior -> (B, T, C, h, w) scaled latents; the mode without a generator."""
    z = mean
    if generator is not None:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
    return (z * scale).permute(0, 2, 1, 3, 4)
