# Patchify / unpatchify of (B, T, C, H, W) frames (every family), and what the linear-patch models of the
# factorized and Phenaki families share: the timestep MLP, the output head and seeded per-name initialisation.
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from einops import rearrange

from cpdit.seeding import param_generator


def patch_grid(H: int, W: int, p: int) -> tuple[int, int]:
    if H % p or W % p:
        raise ValueError(f"latent height {H} and width {W} must be divisible by patch_size={p}")
    return H // p, W // p


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, h*w, C*p*p), patches row-major."""
    return rearrange(x, "b t c (h p1) (w p2) -> b t (h w) (c p1 p2)", p1=p, p2=p)


def unpatchify(y: torch.Tensor, p: int, h: int, w: int, channels: int) -> torch.Tensor:
    """(B, T, h*w, C*p*p) -> (B, T, C, h*p, w*p): the inverse of patchify."""
    return rearrange(y, "b t (h w) (c p1 p2) -> b t c (h p1) (w p2)", h=h, w=w, c=channels, p1=p, p2=p)


class PatchVideoModel(nn.Module):
    """Base of FactorizedDiT and PhenakiDiT: `patch_embed`, `time_embed`, `norm_out`, `proj_out`, and
    deterministic initialisation by parameter name (identical on every rank, whatever the sharding)."""

    frames_per_patch = 1  # every latent frame is a frame of tokens (context parallelism partitions frames)

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, hidden: int, time_embed_dim: int):
        super().__init__()
        p = patch_size
        self.patch_embed = nn.Linear(in_channels * p * p, hidden)
        self.time_embed = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, p * p * out_channels)

    def special_value(self, name: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator):
        """A family's own initial value for `name`, or None for the default."""
        return None

    def initial_value(self, name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        gen = param_generator(seed, name)
        special = self.special_value(name, shape, dtype, gen)
        if special is not None:
            return special
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name.rsplit(".", 2)[-2] and leaf == "weight":
            return torch.ones(shape, dtype=dtype)
        if leaf == "bias":
            return torch.zeros(shape, dtype=dtype)
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, assign: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        assign = assign or (lambda param, value: param.copy_(value.to(param.device)))
        for name, param in self.named_parameters():
            assign(param, self.initial_value(name, param.shape, param.dtype, seed))


def patch_frame_padding(frames: int, frames_per_patch: int) -> int:
    """Leading copies of the first latent frame that make `frames` a multiple of `frames_per_patch`. CogVideoX 1.5
    patches pairs of latent frames while its VAE gives an odd count: its pipelines sample the padded count and drop
    the leading frames before decoding, and its fine-tuning repeats the first latent frame in front."""
    return -frames % frames_per_patch


def pad_leading_frames(x: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """(..., T, ...) -> (..., n + T, ...): `n` copies of frame 0 in front."""
    if n == 0:
        return x
    first = x.narrow(dim, 0, 1)
    return torch.cat([first.expand(*[n if d == dim % x.dim() else -1 for d in range(x.dim())]), x], dim)
