# The seam between the single-device model and parallelism: which frames this process computes, how attention
# over the joint [text | video] sequence is evaluated, and how local frames return to the full video.
# `LocalContext` is the single-device answer; parallel/ supplies a context-parallel one. The model never
# knows about ranks.
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class BoundSequence(Protocol):
    """A sequence context bound to one input shape (frames, tokens per frame, text length)."""

    def frame_ids(self, device: torch.device) -> torch.Tensor:
        """Global indices (T_local,) of the frames this process computes, in local order."""

    def shard_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Full-video tensor (..., T, ...) -> this process's frames (..., T_local, ...)."""

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of shard_frames (autograd-aware)."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over the joint sequence; q, k, v (B, H, L + T_local * tpf, D) -> same shape."""

    def axes(self, num_tokens: int):
        """The frames <-> spatial-tokens seam of factorized models (cpdit/factorized.py) for frames of
        `num_tokens` tokens."""


class SequenceContext(Protocol):
    def bind(self, num_frames: int, tokens_per_frame: int, text_len: int) -> BoundSequence: ...


class _LocalBound:
    def __init__(self, num_frames: int):
        self.num_frames = num_frames

    def frame_ids(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.num_frames, device=device)

    def shard_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def axes(self, num_tokens: int):
        from cpdit.factorized import LocalAxes

        return LocalAxes()


class LocalContext:
    """Single device: every frame is local, attention is SDPA."""

    def bind(self, num_frames: int, tokens_per_frame: int, text_len: int) -> BoundSequence:
        return _LocalBound(num_frames)
