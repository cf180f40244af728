# A CogVideoX transformer block: expert adaLN-zero norms (separate shift/scale/gate for text and video), joint
# self-attention with per-head q/k LayerNorm (+ 3D RoPE on video tokens), GELU-tanh feed-forward.
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpdit.embeddings import apply_rope
from cpdit.sequence import BoundSequence


class LayerNormZero(nn.Module):
    """CogVideoXLayerNormZero: one LayerNorm, modulation (shift, scale, gate) x (video, text) from the timestep."""

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, video, text, temb):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb)).chunk(6, dim=1)  # 6 x (B, dim)
        video = self.norm(video) * (1 + scale[:, None]) + shift[:, None]
        text = self.norm(text) * (1 + t_scale[:, None]) + t_shift[:, None]
        return video, text, gate[:, None], t_gate[:, None]


class JointAttention(nn.Module):
    """Self-attention over [text | video]. Heads are inferred from the projection width, so a tensor-parallel
    shard of q/k/v (column-parallel) simply runs its local heads."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, qk_eps: float):
        super().__init__()
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=qk_eps)
        self.norm_k = nn.LayerNorm(head_dim, eps=qk_eps)
        self.to_out = nn.Linear(inner, dim, bias=True)

    def forward(self, video, text, seq: BoundSequence, rope: tuple[torch.Tensor, torch.Tensor] | None):
        L = text.shape[1]
        x = torch.cat([text, video], dim=1)  # (B, L + N, dim)
        B, S, _ = x.shape
        lora = getattr(self, "lora", None)  # optional adapters (cpdit/lora.py)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if lora is not None:
            q, k, v = q + lora["to_q"](x), k + lora["to_k"](x), v + lora["to_v"](x)
        q = self.norm_q(q.view(B, S, -1, self.head_dim))  # (B, S, H_local, Dh)
        k = self.norm_k(k.view(B, S, -1, self.head_dim))
        v = v.view(B, S, -1, self.head_dim)
        if rope is not None:  # video tokens only
            q = torch.cat([q[:, :L], apply_rope(q[:, L:], *rope)], dim=1)
            k = torch.cat([k[:, :L], apply_rope(k[:, L:], *rope)], dim=1)
        out = seq.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H_local, S, Dh)
        out = out.transpose(1, 2).reshape(B, S, -1)  # (B, S, H_local * Dh)
        out = self.to_out(out) + (lora["to_out"](out) if lora is not None else 0)  # (B, S, dim)
        return out[:, L:], out[:, :L]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(
        self, dim: int, heads: int, head_dim: int, time_dim: int, ff_hidden: int, eps: float, qk_eps: float, bias: bool
    ):
        super().__init__()
        self.norm1 = LayerNormZero(time_dim, dim, eps)
        self.attn = JointAttention(dim, heads, head_dim, bias, qk_eps)
        self.norm2 = LayerNormZero(time_dim, dim, eps)
        self.ff = FeedForward(dim, ff_hidden)

    def forward(self, video, text, temb, seq: BoundSequence, rope=None):
        """video (B, N_local, dim), text (B, L, dim), temb (B, time_dim) -> (video, text)."""
        L = text.shape[1]
        n_video, n_text, gate, t_gate = self.norm1(video, text, temb)
        a_video, a_text = self.attn(n_video, n_text, seq, rope)
        video = video + gate * a_video
        text = text + t_gate * a_text
        n_video, n_text, gate, t_gate = self.norm2(video, text, temb)
        ff = self.ff(torch.cat([n_text, n_video], dim=1))
        return video + gate * ff[:, L:], text + t_gate * ff[:, :L]
