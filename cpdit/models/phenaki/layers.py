# The layers of the Phenaki family, as phenaki-pytorch (lucidrains) writes them: cosine-similarity attention with
# learned per-dimension q/k scales and a fixed temperature, learned null keys/values, causal self-attention with
# ALiBi (the null keys included), an additive position bias from outside (the continuous position bias,
# cpdit/attn_bias.py), cross-attention to the text with a padding mask, a positional-encoding generator (PEG: a
# depthwise 3D convolution, optionally causal in time) and a GEGLU feed-forward. cpdit/models/phenaki/convert.py loads
# phenaki-pytorch weights. Activations are (B, T_r * h * w, D): this process's frames, row-major.
#
# Two seams: `seq` (the bound sequence seam, cpdit/sequence.py: attention over all frames, frame windows for the PEG)
# and `heads` (which of the head-indexed tensors this process computes: all of them on one device; its share under
# tensor parallelism, where parallel/ swaps in a view whose backward sums the shared parameters' gradients over tp).
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpdit.attn_bias import AttentionBias, alibi_slopes, alibi_table
from cpdit.seams import AllHeads


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
    """phenaki-pytorch's attention: queries from the (bias-free) LayerNorm of x, keys and values from x itself
    (self-attention) or from the normed context (cross-attention); q and k l2-normalised and scaled per dimension
    (`q_scale`, `k_scale`), a fixed temperature `scale`; `num_null_kv` learned null keys/values prepended, the keys
    normalised and scaled like every key. `causal` self-attention adds ALiBi (`alibi`) over the positions of the bound
    sequence, the null keys included, and masks later positions. Self-attention runs through the sequence seam (over
    every frame); cross-attention to a (replicated) context is local.

    Positions: a sequence bound with one token per frame gives phenaki-pytorch's token-causal attention (ALiBi over
    token distance); the PhenakiDiT binds whole frames, which makes attention frame-causal with ALiBi over frame
    distance (cpdit's extension to video; the two agree at one token per frame). `norm_bias=True` gives the norms a
    trainable bias (an extension; phenaki-pytorch's are bias-free)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        *,
        causal: bool = False,
        alibi: bool = True,
        num_null_kv: int = 0,
        scale: float = 8.0,
        norm_bias: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.num_heads, self.head_dim, self.scale = heads, head_dim, scale
        self.causal, self.alibi = causal, alibi
        self.norm = nn.LayerNorm(dim, bias=norm_bias)
        self.context_norm = nn.LayerNorm(context_dim, bias=norm_bias) if context_dim else None
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
        """Self-attention: x (B, N_r, D) with `seq` and `bias` (grid, position table, frame padding; the null kv and
        ALiBi are added here). Cross-attention: `context` (B, L, context_dim) with `context_mask` (B, L) bool
        (False: padding)."""
        kv_in = x if context is None else self.context_norm(context)
        q, k, v = self._split(self.to_q(self.norm(x))), self._split(self.to_k(kv_in)), self._split(self.to_v(kv_in))
        k_scale = self.heads.shared(self.k_scale)
        q = F.normalize(q, dim=-1) * self.heads.shared(self.q_scale)
        k = F.normalize(k, dim=-1) * k_scale
        null = None
        if self.null_kv is not None:
            nk, nv = self.heads.local(self.null_kv, 1)  # (h_local, n, head_dim) each
            null = torch.stack([F.normalize(nk, dim=-1) * k_scale, nv])  # (2, h_local, n, head_dim)
        if context is None:
            if bias is None:
                raise ValueError("self-attention needs the AttentionBias that carries the grid (T, h, w)")
            table, slopes = bias.table, None
            if self.causal and self.alibi:
                all_slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=q.dtype, device=q.device)
                slopes = self.heads.local(all_slopes, 0)  # (h_local,)
                ali = alibi_table(slopes, bias.grid[0])  # (h_local, 2T-1, 1, 1)
                table = ali if table is None else table + ali
            b = AttentionBias(bias.grid, table, null, None, bias.frame_lengths, None if null is None else slopes)
            out = seq.attention(q, k, v, causal=self.causal, bias=b, scale=self.scale)
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
    """One layer of phenaki-pytorch's Transformer: PEG (optional), self-attention (causal or not), cross-attention
    to the text (when `context_dim`), feed-forward. Defaults are phenaki-pytorch's; `self_null_kv` (null keys on the
    self-attention; phenaki-pytorch has none there) and `norm_bias` are cpdit's extensions."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        context_dim: int | None = None,
        causal: bool = False,
        alibi: bool = True,
        self_null_kv: int = 0,
        cross_null_kv: int = 2,
        peg: bool = False,
        peg_causal: bool = False,
        ff_mult: float = 4.0,
        scale: float = 8.0,
        norm_bias: bool = False,
    ):
        super().__init__()
        self.peg = PEG(dim, peg_causal) if peg else None
        common = dict(scale=scale, norm_bias=norm_bias)
        self.attn = Attention(
            dim, heads, head_dim, None, causal=causal, alibi=alibi, num_null_kv=self_null_kv, **common
        )
        self.cross = None
        if context_dim:
            self.cross = Attention(dim, heads, head_dim, context_dim, num_null_kv=cross_null_kv, **common)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, seq, bias: AttentionBias, text, text_mask, grid: tuple[int, int]) -> torch.Tensor:
        if self.peg is not None:
            x = x + self.peg(x, grid, seq)
        x = x + self.attn(x, seq, bias)
        if self.cross is not None and text is not None:
            x = x + self.cross(x, context=text, context_mask=text_mask)
        return x + self.ff(x)
