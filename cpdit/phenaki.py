# The layers of the Phenaki family (the seed's C-ViViT / MaskGit transformer): cosine-similarity attention with
# learned per-dimension q/k scales and a fixed temperature, learned null keys/values prepended to every attention,
# frame-causal self-attention with ALiBi and a continuous position bias (cpdit/attn_bias.py), cross-attention to the
# text with a padding mask, a causal positional-encoding generator (PEG: a depthwise 3D convolution, causal in
# time), and a GEGLU feed-forward. Activations are (B, T_r * h * w, D): this process's frames, row-major.
#
# Two seams: `seq` (the bound sequence context: attention over all frames, frame windows for the PEG) and `heads`
# (which of the head-indexed tensors this process computes: all of them on one device; its share under tensor
# parallelism, where parallel/ swaps in a view whose backward sums the shared parameters' gradients over tp).
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpdit.attn_bias import AttentionBias


class AllHeads:
    """Single device (no tensor parallelism): every head is local."""

    def local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """A per-head tensor (heads along `dim`) -> the heads this process computes."""
        return t

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter used by every head (its gradient must cover all heads)."""
        return t


class PEG(nn.Module):
    """Position generating module: depthwise 3x3x3 convolution over (T, h, w), zero-padded; causal in time pads two
    past frames and no future one."""

    def __init__(self, dim: int, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], seq) -> torch.Tensor:
        """x (B, T_r * h * w, D) -> same shape."""
        h, w = grid
        B, N, D = x.shape
        frames = x.reshape(B, N // (h * w), h, w, D)
        before, after = (2, 0) if self.causal else (1, 1)
        outs = []
        for win in seq.windows(frames, before, after):  # (B, before + n + after, h, w, D) per local segment
            v = F.pad(win.permute(0, 4, 1, 2, 3), (1, 1, 1, 1))  # (B, D, frames, h + 2, w + 2)
            outs.append(self.conv(v).permute(0, 2, 3, 4, 1))  # (B, n, h, w, D)
        return torch.cat(outs, dim=1).reshape(B, N, D)


class Attention(nn.Module):
    """Cosine-similarity attention with `num_null_kv` learned null keys/values. Self-attention (context None) runs
    through the sequence seam over every frame; cross-attention to a (replicated) context is local."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, num_null_kv: int = 2,
                 scale: float = 8.0):  # fmt: skip
        super().__init__()
        inner = heads * head_dim
        self.head_dim, self.scale = head_dim, scale
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.null_kv = nn.Parameter(torch.zeros(2, heads, num_null_kv, head_dim)) if num_null_kv else None
        self.q_scale = nn.Parameter(torch.ones(head_dim))
        self.k_scale = nn.Parameter(torch.ones(head_dim))
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.heads = AllHeads()

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1, self.head_dim).transpose(1, 2)  # (B, h_local, S, head_dim)

    def forward(self, x: torch.Tensor, seq=None, bias: AttentionBias | None = None, context=None, context_mask=None):
        """Self-attention: x (B, N_r, D) with `seq` and `bias` (grid, table, frame padding; null kv added here).
        Cross-attention: `context` (B, L, context_dim) with `context_mask` (B, L) bool (False: padding)."""
        xn = self.norm(x)
        kv_in = xn if context is None else self.context_norm(context)
        q, k, v = self._split(self.to_q(xn)), self._split(self.to_k(kv_in)), self._split(self.to_v(kv_in))
        q = F.normalize(q, dim=-1) * self.heads.shared(self.q_scale)
        k = F.normalize(k, dim=-1) * self.heads.shared(self.k_scale)
        null = None if self.null_kv is None else self.heads.local(self.null_kv, 1)  # (2, h_local, n, head_dim)
        if context is None:
            b = AttentionBias(bias.grid, bias.table, null, None, bias.frame_lengths)
            out = seq.attention(q, k, v, causal=True, bias=b, scale=self.scale)
        else:
            out = _cross_attention(q, k, v, null, context_mask, self.scale)
        B, _, S, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, S, -1))


def _cross_attention(q, k, v, null, mask, scale):
    B = q.shape[0]
    add = None
    if mask is not None:
        add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if null is not None:
        k = torch.cat([null[0].to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([null[1].to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        add = None if add is None else F.pad(add, (null.shape[2], 0))
    add = None if add is None else add[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=scale)


class FeedForward(nn.Module):
    """LayerNorm, GEGLU (value and gate as separate projections, so tensor parallelism splits both), out."""

    def __init__(self, dim: int, mult: float = 4.0):
        super().__init__()
        inner = int(mult * (2 / 3) * dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, inner, bias=False)
        self.gate = nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.out(self.proj(x) * F.gelu(self.gate(x)))


class PhenakiBlock(nn.Module):
    """PEG (optional), frame-causal self-attention, cross-attention to the text (optional), feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, num_null_kv: int, peg: bool,
                 peg_causal: bool, ff_mult: float, scale: float):  # fmt: skip
        super().__init__()
        self.peg = PEG(dim, peg_causal) if peg else None
        self.attn = Attention(dim, heads, head_dim, None, num_null_kv, scale)
        self.cross = Attention(dim, heads, head_dim, context_dim, num_null_kv, scale) if context_dim else None
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, seq, bias: AttentionBias, text, text_mask, grid: tuple[int, int]) -> torch.Tensor:
        if self.peg is not None:
            x = x + self.peg(x, grid, seq)
        x = x + self.attn(x, seq, bias)
        if self.cross is not None:
            x = x + self.cross(x, context=text, context_mask=text_mask)
        return x + self.ff(x)
