# The seam between the single-device model and parallelism: which frames this process computes, how attention
# over the joint [text | video] sequence is evaluated, and how local frames return to the full video.
# `LocalSequence` is the single-device answer; parallel/ supplies a context-parallel one. The model never
# knows about ranks.
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from cpdit.attn_bias import AttentionBias, dense_attention
from cpdit.seams import LocalAxes


class BoundSequence(Protocol):
    """The sequence seam bound to one input shape (frames, tokens per frame, text length)."""

    def frame_ids(self, device: torch.device) -> torch.Tensor:
        """Global indices (T_local,) of the frames this process computes, in local order."""

    def shard_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Full-video tensor (..., T, ...) -> this process's frames (..., T_local, ...)."""

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of shard_frames (autograd-aware)."""

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        bias: AttentionBias | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention over the joint sequence; q, k, v (B, H, L + T_local * tpf, D) -> same shape. `causal`: frame-
        causal; `bias`: additive biases/masks on global positions; `scale`: softmax
        scale (None: D ** -0.5)."""

    def windows(self, x: torch.Tensor, before: int, after: int) -> list[torch.Tensor]:
        """x (B, T_local, ...) -> per local run of consecutive frames, (B, before + n + after, ...) with the
        neighbouring frames (zeros outside the video): the input of a temporal convolution."""

    def axes(self, num_tokens: int):
        """The frames <-> spatial-tokens seam of factorized models (cpdit/models/factorized/layers.py) for frames of
        `num_tokens` tokens."""


class SequenceSeam(Protocol):
    def bind(self, num_frames: int, tokens_per_frame: int, text_len: int) -> BoundSequence:
        """The model's sequence: `num_frames` frames of `tokens_per_frame` tokens after `text_len` text tokens."""

    def frames(self, num_frames: int) -> BoundSequence:
        """The frame partition alone (frame_ids, shard_frames, gather_frames): the same frames as any `bind` with
        `num_frames`, for tensors beside the model's activations (loss targets, per-frame noise levels)."""


class _LocalBound:
    def __init__(self, num_frames: int, tokens_per_frame: int = 1, text_len: int = 0):
        self.num_frames, self.tokens_per_frame, self.text_len = num_frames, tokens_per_frame, text_len

    def frame_ids(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.num_frames, device=device)

    def shard_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def attention(
        self, q, k, v, *, causal: bool = False, bias: AttentionBias | None = None, scale: float | None = None
    ) -> torch.Tensor:
        if not causal and bias is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        bias = bias or AttentionBias((self.num_frames, self.tokens_per_frame, 1))
        return dense_attention(q, k, v, bias, text_len=self.text_len, causal=bool(causal), scale=scale)

    def windows(self, x: torch.Tensor, before: int, after: int) -> list[torch.Tensor]:
        pad = [x.new_zeros((x.shape[0], n, *x.shape[2:])) for n in (before, after)]
        return [torch.cat([pad[0], x, pad[1]], dim=1)]

    def axes(self, num_tokens: int):
        return LocalAxes()


class LocalSequence:
    """Single device: every frame is local, attention is SDPA."""

    def bind(self, num_frames: int, tokens_per_frame: int, text_len: int) -> BoundSequence:
        return _LocalBound(num_frames, tokens_per_frame, text_len)

    def frames(self, num_frames: int) -> BoundSequence:
        return _LocalBound(num_frames)
