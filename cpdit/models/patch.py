# What the linear-patch diffusion models of the other families (factorized, Phenaki) share: patchify /
# unpatchify of (B, T, C, H, W) frames, the timestep MLP, the output head and seeded per-name initialisation.
from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn as nn


def patch_grid(H: int, W: int, p: int) -> tuple[int, int]:
    if H % p or W % p:
        raise ValueError(f"latent height {H} and width {W} must be divisible by patch_size={p}")
    return H // p, W // p


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, h*w, C*p*p), patches row-major."""
    B, T, C, H, W = x.shape
    h, w = H // p, W // p
    return x.reshape(B, T, C, h, p, w, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, T, h * w, C * p * p)


def unpatchify(y: torch.Tensor, p: int, h: int, w: int, channels: int) -> torch.Tensor:
    """(B, T, h*w, p*p*C) -> (B, T, C, h*p, w*p)."""
    B, T = y.shape[:2]
    y = y.reshape(B, T, h, w, channels, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return y.reshape(B, T, channels, h * p, w * p)


class PatchVideoModel(nn.Module):
    """Base of FactorizedDiT and PhenakiDiT: `patch_embed`, `time_embed`, `norm_out`, `proj_out`, and
    deterministic initialisation by parameter name (identical on every rank, whatever the sharding)."""

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
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
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
