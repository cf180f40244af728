# The factorized spatial/temporal video transformer of Stable Video Diffusion (the seed's SpatialVideoTransformer):
# spatial blocks attend within each frame (self-attention, cross-attention to the text context, GEGLU feed-forward),
# temporal blocks attend across the frames of each spatial position (with a learned time positional embedding added
# first), and an AlphaBlender mixes the two. Activations are (B, T, S, D): frames x spatial tokens.
#
# The axis seam `axes` is where context parallelism enters: spatial blocks run on the frames this process holds
# (B, T_r, S, D); `axes.to_temporal` hands over to a (B, T, S_r, D) layout where every frame of this process's
# spatial tokens is local, and `axes.to_spatial` returns. `LocalAxes` (cpdit/seams.py) is the single-device answer;
# parallel/axis_switch.py switches with one all-to-all each way.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpdit.seams import LocalAxes


@dataclass(frozen=True)
class FactorizedConfig:
    """sgm's SpatialVideoTransformer knobs, defaults as sgm has them; the fields marked as extensions go further."""

    in_channels: int = 32
    num_heads: int = 4
    head_dim: int = 8
    depth: int = 1
    """(spatial block, temporal block) pairs."""
    temporal_blocks: int = 1
    """Temporal blocks after each spatial block. Extension: sgm always has one (its `time_depth` is stored and never
    used), so a value above 1 has no sgm weights."""
    context_dim: int | None = None
    """Width of the text context. None: attn2 of the spatial blocks attends to the frame itself (as in sgm)."""
    merge_strategy: str = "fixed"
    """AlphaBlender: fixed, learned, or learned_with_images (frames flagged as images keep the spatial output)."""
    merge_factor: float = 0.5
    """fixed: the spatial weight alpha; learned: the initial logit of alpha."""
    use_spatial_context: bool = False
    """The temporal attn2 cross-attends to the spatial context (its first frame's, when it is given per frame).
    False: to `time_context` when one is given (width `time_context_dim`), else attn2 is a second self-attention over
    the frames."""
    time_context_dim: int | None = None
    """Width of a separate temporal context (use_spatial_context=False)."""
    disable_temporal_crossattention: bool = False
    """No attn2 in the temporal blocks."""
    disable_self_attn: bool = False
    """attn1 of every block cross-attends to the context instead of attending to itself."""
    ff_in: bool = True
    """Temporal blocks start with their own residual GEGLU feed-forward (sgm's `ff_in`, always on in sgm's
    SpatialVideoTransformer). False is an extension."""
    norm_groups: int = 32
    """GroupNorm groups of the input norm (sgm: 32). Other values are an extension for narrow models."""
    max_time_embed_period: float = 10000.0

    def __post_init__(self) -> None:
        if self.merge_strategy not in ("fixed", "learned", "learned_with_images"):
            raise ValueError(f"merge_strategy={self.merge_strategy!r} is not fixed, learned or learned_with_images")
        if self.in_channels % self.norm_groups:
            raise ValueError(f"norm_groups={self.norm_groups} must divide in_channels={self.in_channels}")
        if self.temporal_blocks < 1:
            raise ValueError(f"temporal_blocks={self.temporal_blocks} must be >= 1")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def temporal_context_dim(self) -> int | None:
        return self.context_dim if self.use_spatial_context else self.time_context_dim


class Attention(nn.Module):
    """sgm's CrossAttention: self-attention when no context is given, else cross-attention to it."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, L, dim), context (N, M, context_dim) or None (self-attention)."""
        ctx = x if context is None else context
        if ctx.shape[-1] != self.to_k.in_features:
            raise ValueError(
                f"this attention takes a context of width {self.to_k.in_features}; got {ctx.shape[-1]} "
                f"({'no context was given, so it attends to its input' if context is None else 'the given context'})"
            )
        N, L, _ = x.shape
        # heads from the width: under tensor parallelism a rank holds heads / tp of them
        q, k, v = (
            t.reshape(N, t.shape[1], -1, self.head_dim).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, head_dim)
        return self.to_out(out.transpose(1, 2).reshape(N, L, -1))


class GEGLUFeedForward(nn.Module):
    """out(proj(x) * gelu(gate(x))); value and gate are separate projections (sgm fuses them into one, value first)
    so that tensor parallelism can split both by columns."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, inner)
        self.gate = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim_out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(x) * F.gelu(self.gate(x)))


class SpatialBlock(nn.Module):
    """sgm's BasicTransformerBlock, within a frame: attn1 (self-attention, or cross-attention with
    disable_self_attn), attn2 (cross-attention to the context; self-attention without one), feed-forward.
    (N, S, D) with N = B x T_r."""

    def __init__(self, c: FactorizedConfig):
        super().__init__()
        d = c.inner_dim
        self.disable_self_attn = c.disable_self_attn
        self.norm1 = nn.LayerNorm(d)
        self.attn1 = Attention(d, c.num_heads, c.head_dim, c.context_dim if c.disable_self_attn else None)
        self.norm2, self.attn2 = nn.LayerNorm(d), Attention(d, c.num_heads, c.head_dim, c.context_dim)
        self.norm3, self.ff = nn.LayerNorm(d), GEGLUFeedForward(d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class TemporalBlock(nn.Module):
    """sgm's VideoTransformerBlock, across frames at one spatial position: ff_in, attn1, attn2 (to the temporal
    context; a second self-attention without one), feed-forward. (N, T, D) with N = B x S_r."""

    def __init__(self, c: FactorizedConfig):
        super().__init__()
        d, ctx = c.inner_dim, c.temporal_context_dim
        self.disable_self_attn = c.disable_self_attn
        self.norm_in = nn.LayerNorm(d) if c.ff_in else None
        self.ff_in = GEGLUFeedForward(d) if c.ff_in else None
        self.norm1 = nn.LayerNorm(d)
        self.attn1 = Attention(d, c.num_heads, c.head_dim, ctx if c.disable_self_attn else None)
        cross = not c.disable_temporal_crossattention
        self.attn2 = Attention(d, c.num_heads, c.head_dim, ctx) if cross else None
        self.norm2 = nn.LayerNorm(d) if cross else None
        self.norm3, self.ff = nn.LayerNorm(d), GEGLUFeedForward(d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.ff_in is not None:
            x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class AlphaBlender(nn.Module):
    """alpha * spatial + (1 - alpha) * temporal; alpha fixed, learned (sigmoid of a parameter), or learned with
    alpha = 1 on frames flagged as images (`image_only_indicator`)."""

    def __init__(self, strategy: str, merge_factor: float):
        super().__init__()
        self.strategy = strategy
        if strategy == "fixed":
            self.register_buffer("mix_factor", torch.tensor([merge_factor]))
        else:
            self.mix_factor = nn.Parameter(torch.tensor([merge_factor]))

    def alpha(self, image_only_indicator: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, T_r) indicator -> alpha broadcastable to (B, T_r, S, D)."""
        if self.strategy == "fixed":
            return self.mix_factor
        alpha = torch.sigmoid(self.mix_factor)
        if self.strategy == "learned_with_images":
            if image_only_indicator is None:
                image_only_indicator = torch.zeros(shape[:2], device=alpha.device)
            alpha = torch.where(image_only_indicator.bool(), torch.ones_like(alpha), alpha)
            return alpha[:, :, None, None]
        return alpha

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor, image_only_indicator=None) -> torch.Tensor:
        alpha = self.alpha(image_only_indicator, spatial.shape).to(spatial.dtype)
        return alpha * spatial + (1.0 - alpha) * temporal


def time_embedding(frames: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=frames.device) / half)
    args = frames.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (T, dim)


class SpatialVideoTransformer(nn.Module):
    """sgm's SpatialVideoTransformer. x (B, T_r, S, C) -> same shape: GroupNorm per frame, project in, `depth` x
    (spatial block, time positional embedding + temporal block(s), AlphaBlender), project out, residual. (sgm's
    1x1-convolution and linear projections are the same map: cpdit/models/factorized/convert.py loads either.)"""

    def __init__(self, c: FactorizedConfig):
        super().__init__()
        self.config = c
        d = c.inner_dim
        self.norm = nn.GroupNorm(c.norm_groups, c.in_channels, eps=1e-6)
        self.proj_in = nn.Linear(c.in_channels, d)
        self.time_pos_embed = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.transformer_blocks = nn.ModuleList(SpatialBlock(c) for _ in range(c.depth))
        self.time_stack = nn.ModuleList(
            nn.ModuleList(TemporalBlock(c) for _ in range(c.temporal_blocks)) for _ in range(c.depth)
        )
        self.time_mixer = AlphaBlender(c.merge_strategy, c.merge_factor)
        self.proj_out = nn.Linear(d, c.in_channels)

    def _spatial_context(self, context, Tr: int, ids) -> torch.Tensor | None:
        """(B x T_r, L, C): the context of each local frame."""
        if context is None:
            return None
        if context.dim() == 4:  # (B, T, L, C): a context per frame
            return context.index_select(1, ids).flatten(0, 1)
        return context.repeat_interleave(Tr, dim=0)

    def _temporal_context(self, context, time_context, Sr: int) -> torch.Tensor | None:
        """(B x S_r, L', C'): the context of each local spatial position's temporal sequence."""
        if self.config.use_spatial_context:
            ctx = None if context is None else (context[:, 0] if context.dim() == 4 else context)  # sgm: frame 0's
        else:
            ctx = time_context
            if ctx is not None and ctx.dim() == 2:
                ctx = ctx[:, None]  # (B, C) -> (B, 1, C)
        return None if ctx is None else ctx.repeat_interleave(Sr, dim=0)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        image_only_indicator: torch.Tensor | None = None,
        axes=None,
        time_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T_r, S, C) (this process's frames); context (B, L, context_dim), or (B, T, L, context_dim) per
        frame; image_only_indicator (B, T); time_context (B, L', time_context_dim) or (B, time_context_dim)."""
        axes = axes or LocalAxes()
        c = self.config
        B, Tr, S, C = x.shape
        h = self.norm(x.reshape(B * Tr, S, C).transpose(1, 2)).transpose(1, 2)  # per-frame GroupNorm
        h = self.proj_in(h).reshape(B, Tr, S, -1)  # (B, T_r, S, D)
        per_frame = context if context is not None and context.dim() == 4 else image_only_indicator  # (B, T, ...)
        ids = None if per_frame is None else axes.frame_ids(per_frame.shape[1], x.device)  # the local frames' ids
        indicator = None if image_only_indicator is None else image_only_indicator.index_select(1, ids)  # (B, T_r)
        frame_ctx, time_ctx = self._spatial_context(context, Tr, ids), None
        for spatial, temporal in zip(self.transformer_blocks, self.time_stack, strict=True):
            h = spatial(h.reshape(B * Tr, S, -1), frame_ctx).reshape(B, Tr, S, -1)
            m = axes.to_temporal(h)  # (B, T, S_r, D)
            T, Sr = m.shape[1], m.shape[2]
            emb = time_embedding(torch.arange(T, device=x.device), m.shape[-1], c.max_time_embed_period)
            emb = self.time_pos_embed(emb.to(m.dtype))
            m = (m + emb[None, :, None, :]).transpose(1, 2).reshape(B * Sr, T, -1)  # (B*S_r, T, D)
            if time_ctx is None:
                time_ctx = self._temporal_context(context, time_context, Sr)
            for block in temporal:
                m = block(m, time_ctx)
            m = axes.to_spatial(m.reshape(B, Sr, T, -1).transpose(1, 2))  # (B, T_r, S, D)
            h = self.time_mixer(h, m, indicator)
        return x + self.proj_out(h)
