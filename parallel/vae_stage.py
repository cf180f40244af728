# The CogVideoX VAE as a context-parallel first stage: the ranks of a cp group each encode (decode) their own frames
# of the clip (whole latent frames, rank 0 with the lone first frame) and the results are gathered, so callers see
# the whole clip, identical on every rank of the group, as with cpdit.first_stage.VAEStage on one device. The
# posterior noise is drawn for the whole clip and sharded, so a sample does not depend on the layout.
from __future__ import annotations

import torch
import torch.distributed as dist

from cpdit.first_stage import VAEStage
from parallel.vae import CPTime, double_counts, gather_time, latent_partition, pixel_partition, shard_time


class ContextParallelVAE:
    def __init__(self, stage: VAEStage, group: dist.ProcessGroup):
        self.stage, self.group = stage, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.latent_channels = stage.latent_channels
        self.temporal_factor, self.spatial_factor = stage.temporal_factor, stage.spatial_factor

    def _partitions(self, latent_frames: int) -> tuple[list[int], list[int]]:
        lat = latent_partition(latent_frames, self.size)
        return lat, pixel_partition(lat, self.temporal_factor)

    @torch.no_grad()
    def moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective over the group: each rank encodes its frames; the (mean, logvar) of the clip are gathered."""
        vae = self.stage.vae
        lat, pix = self._partitions(vae.config.latent_frames(video.shape[1]))
        x = video.permute(0, 2, 1, 3, 4).to(next(vae.parameters()).dtype)  # (B, 3, F, H, W)
        post = vae.encode(shard_time(x, pix, self.rank).contiguous(), CPTime(self.group, pix))
        both = gather_time(torch.cat([post.mean, post.logvar], dim=1), lat, self.group)  # (B, 2C, T, h, w)
        return both.chunk(2, dim=1)

    def latents(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.stage.latents(mean, logvar, generator)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents(*self.moments(video), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae, scale = self.stage.vae, self.stage.scale
        lat = latent_partition(latents.shape[1], self.size)
        pix = lat
        for _ in range(vae.config.time_levels):  # as the decoder resamples: 13 latents -> 49 frames, 4 -> 16
            pix = double_counts(pix)
        z = latents.permute(0, 2, 1, 3, 4).to(next(vae.parameters()).dtype) / scale
        out = vae.decode(shard_time(z, lat, self.rank).contiguous(), CPTime(self.group, lat))
        return gather_time(out, pix, self.group).permute(0, 2, 1, 3, 4).clamp(-1, 1)
