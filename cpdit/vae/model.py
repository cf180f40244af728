# The CogVideoX causal 3D VAE (as diffusers' AutoencoderKLCogVideoX: same module names and parameters). Encoder:
# causal conv in, down blocks (2x space per level, the first temporal_compression levels also 2x time), mid block,
# GroupNorm + SiLU + causal conv to (mean, logvar). Decoder: the mirror image with SpatialNorm3D conditioned on the
# latents. All cross-frame work goes through the time-axis seam, so the same modules run on one device
# (LocalTime) or with the frames split over context-parallel ranks (parallel/vae.py).
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpdit.vae.batched import run_batched
from cpdit.vae.config import VAEConfig
from cpdit.vae.layers import CausalConv3d, Downsample3D, ResnetBlock3D, SpatialNorm3D, Upsample3D
from cpdit.vae.streaming import stream
from cpdit.vae.time import LocalTime, latent_partition, pixel_partition


class DownBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, c: VAEConfig, add_downsample: bool, compress_time: bool):
        super().__init__()
        g, eps = c.norm_num_groups, c.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock3D(cin if i == 0 else cout, cout, g, eps, None) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample3D(cout, compress_time)]) if add_downsample else None

    def forward(self, x: torch.Tensor, t):
        for resnet in self.resnets:
            x = resnet(x, None, t)
        if self.downsamplers is not None:
            x, t = self.downsamplers[0](x, t)
        return x, t


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, c: VAEConfig, spatial_norm_dim: int | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, c.norm_num_groups, c.norm_eps, spatial_norm_dim) for _ in range(2)
        )

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, t) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, t)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, c: VAEConfig, add_upsample: bool, compress_time: bool):
        super().__init__()
        g, eps, zc = c.norm_num_groups, c.norm_eps, c.latent_channels
        self.resnets = nn.ModuleList(ResnetBlock3D(cin if i == 0 else cout, cout, g, eps, zc) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample3D(cout, compress_time)]) if add_upsample else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor, t):
        for resnet in self.resnets:
            x = resnet(x, zq, t)
        if self.upsamplers is not None:
            x, t = self.upsamplers[0](x, t)
        return x, t


class Encoder3D(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.block_out_channels
        self.conv_in = CausalConv3d(c.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c, i < len(ch) - 1, i < c.time_levels)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock3D(ch[-1], c, None)
        self.norm_out = nn.GroupNorm(c.norm_num_groups, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * c.latent_channels, 3)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """(B, C, T, H, W) pixels -> (B, 2*latent, T', H/f, W/f) moments."""
        x = self.conv_in(x, t)
        for block in self.down_blocks:
            x, t = block(x, t)
        x = self.mid_block(x, None, t)
        return self.conv_out(F.silu(t.group_norm(x, self.norm_out)), t)


class Decoder3D(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = list(reversed(c.block_out_channels))
        zc = c.latent_channels
        self.conv_in = CausalConv3d(zc, ch[0], 3)
        self.mid_block = MidBlock3D(ch[0], c, zc)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, c, i < len(ch) - 1, i < c.time_levels)
            for i in range(len(ch))
        )
        self.norm_out = SpatialNorm3D(ch[-1], zc, c.norm_num_groups)
        self.conv_out = CausalConv3d(ch[-1], c.out_channels, 3)

    def forward(self, z: torch.Tensor, t) -> torch.Tensor:
        """(B, latent, T', h, w) -> (B, C, T, h*f, w*f) pixels."""
        x = self.mid_block(self.conv_in(z, t), z, t)
        for block in self.up_blocks:
            x, t = block(x, z, t)
        return self.conv_out(F.silu(self.norm_out(x, z, t)), t)


@dataclass
class DiagonalGaussian:
    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class CogVideoXVAE(nn.Module):
    """encode: (B, C, T, H, W) in [-1, 1] -> posterior over (B, latent, 1 + (T-1)/4, H/8, W/8); decode: inverse.
    `t` is the time-axis seam (default: the whole video here)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)
        two = 2 * config.out_channels  # sic: diffusers sizes quant_conv by out_channels
        self.quant_conv = nn.Conv3d(two, two, 1) if config.use_quant_conv else None
        out = config.out_channels
        self.post_quant_conv = nn.Conv3d(out, out, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor, t=None) -> DiagonalGaussian:
        moments = self.encoder(x, t or LocalTime())
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: torch.Tensor, t=None) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, t or LocalTime())

    def _chunks(self, latent_frames: int, per_chunk: int) -> list[int]:
        return latent_partition(latent_frames, max(1, -(-latent_frames // per_chunk)))

    @torch.no_grad()
    def encode_chunked(self, x: torch.Tensor, latents_per_chunk: int) -> DiagonalGaussian:
        """encode() streamed over chunks of `latents_per_chunk` latent frames (equal result, one chunk of
        activations alive at a time; cpdit/vae/streaming.py)."""
        lat = self._chunks(self.config.latent_frames(x.shape[2]), latents_per_chunk)
        moments = stream(self.encoder, x, pixel_partition(lat, self.config.temporal_compression_ratio))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    @torch.no_grad()
    def encode_diffusers(self, x: torch.Tensor, frames_per_batch: int = 8) -> DiagonalGaussian:
        """encode() as diffusers' AutoencoderKLCogVideoX computes it: batches of 8 frames, each with its own
        GroupNorm statistics (cpdit/vae/batched.py)."""
        moments = run_batched(self.encoder, x, frames_per_batch)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    @torch.no_grad()
    def decode_diffusers(self, z: torch.Tensor, latents_per_batch: int = 2) -> torch.Tensor:
        """decode() as diffusers computes it: batches of 2 latent frames, each with its own statistics."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return run_batched(self.decoder, z, latents_per_batch)

    @torch.no_grad()
    def decode_chunked(self, z: torch.Tensor, latents_per_chunk: int) -> torch.Tensor:
        """decode() streamed over chunks of `latents_per_chunk` latent frames (equal result)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return stream(self.decoder, z, self._chunks(z.shape[2], latents_per_chunk))
