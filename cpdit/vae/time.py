# The time-axis seam of the causal 3D VAE. Every operation that looks across frames goes through it: the causal
# padding before a temporal convolution, GroupNorm's statistics (over the whole time axis), and whether this
# piece of the video begins with the frame that CogVideoX keeps apart when it halves or doubles time.
# `LocalTime` is the whole video on one device; parallel/vae.py provides the context-parallel one (frames split
# over ranks, halos by P2P, statistics by all-reduce) with the same interface.
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpdit.partition import even_split


class LocalTime:
    """All frames of the video are here."""

    def causal_pad(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, k-1+T, H, W): the first frame repeated in front (CogVideoX's 'first' padding)."""
        return torch.cat([x[:, :, :1]] * (k - 1) + [x], dim=2) if k > 1 else x

    def group_norm(self, x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    def first_apart(self, x: torch.Tensor) -> bool:
        """Does this piece start with a frame that is resampled on its own (odd total frame count)?"""
        return x.shape[2] % 2 == 1

    def halved(self) -> LocalTime:
        return self

    def doubled(self) -> LocalTime:
        return self


def latent_partition(num_latent_frames: int, cp: int) -> list[int]:
    """Latent frames per rank, contiguous, earlier ranks get the remainder (13 on 4 -> 4, 3, 3, 3)."""
    if num_latent_frames < cp:
        raise ValueError(f"{num_latent_frames} latent frames < cp_size={cp}: every VAE rank needs at least one")
    return even_split(num_latent_frames, cp)


def pixel_partition(latent_counts: list[int], temporal_ratio: int) -> list[int]:
    """Pixel frames per rank: rank 0 holds the lone first frame plus ratio x the rest of its latents."""
    return [1 + temporal_ratio * (latent_counts[0] - 1)] + [temporal_ratio * n for n in latent_counts[1:]]


def halve_counts(c: list[int]) -> list[int]:
    """Frames per rank after a temporal 2x downsampling (an odd total keeps rank 0's first frame apart)."""
    odd = sum(c) % 2 == 1
    if any(n % 2 for n in c[1:]) or (c[0] % 2 == 0) == odd:
        raise ValueError(f"frames per rank {c} cannot be halved in time without crossing a rank boundary")
    return [1 + (c[0] - 1) // 2 if odd else c[0] // 2] + [n // 2 for n in c[1:]]


def double_counts(c: list[int]) -> list[int]:
    """Frames per rank after a temporal 2x upsampling (an odd total keeps rank 0's first frame single)."""
    return [1 + 2 * (c[0] - 1) if sum(c) % 2 == 1 else 2 * c[0]] + [2 * n for n in c[1:]]
