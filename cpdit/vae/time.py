# The time-axis seam of the causal 3D VAE. Every operation that looks across frames goes through it: the causal
# padding before a temporal convolution, GroupNorm's statistics (over the whole time axis), and whether this
# piece of the video begins with the frame that CogVideoX keeps apart when it halves or doubles time.
# `LocalTime` is the whole video on one device; parallel/vae.py provides the context-parallel one (frames split
# over ranks, halos by P2P, statistics by all-reduce) with the same interface.
from __future__ import annotations

import torch
import torch.nn.functional as F


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
