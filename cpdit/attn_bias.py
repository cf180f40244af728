# Additive attention biases and masks of the Phenaki family, on global positions, and their dense single-device
# evaluation (the reference that parallel/attention/bias.py must match block by block).
#
# A sequence is [text (L) | video tokens on the grid (T, h, w)]. Every bias is a function of global positions, so a
# context-parallel rank can build the bias of any (query block, key block) pair without communication:
# - `table` (H, 2T-1 | 1, 2h-1 | 1, 2w-1 | 1): bias of a video query at (t, y, x) for a video key at (t', y', x') is
#   table[:, t-t' + T-1, y-y' + h-1, x-x' + w-1]; a dimension of size 1 ignores that coordinate. ALiBi is a table
#   over frame distance only; Phenaki's continuous position bias (an MLP over log-scaled offsets) is evaluated once
#   per offset into a table (the same numbers as evaluating it per pair, and differentiable through the gather).
#   Text keys and text queries get no positional bias.
# - `null_kv` (2, H, n, D): learned keys/values prepended to every attention; every query sees them, bias 0 unless
#   `null_slopes` (H,) is set: causal ALiBi then penalises null key m of n, as phenaki-pytorch does, by
#   -slope * (t + n - m) for a video query in frame t (the null keys sit before position 0).
# - `text_mask` (B, L) bool: padding of the text keys (False = padding).
# - `frame_lengths` (B,): valid frames of each sample; keys in frames >= length are padding.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass
class AttentionBias:
    grid: tuple[int, int, int]  # (T, h, w) of the full video
    table: torch.Tensor | None = None  # (H, 2T-1 | 1, 2h-1 | 1, 2w-1 | 1)
    null_kv: torch.Tensor | None = None  # (2, H, n, D)
    text_mask: torch.Tensor | None = None  # (B, L) bool
    frame_lengths: torch.Tensor | None = None  # (B,) long
    null_slopes: torch.Tensor | None = None  # (H,) ALiBi slopes of the null keys (causal attention)

    def __post_init__(self) -> None:
        if self.table is not None:
            T, h, w = self.grid
            for size, n, name in zip(self.table.shape[1:], (T, h, w), ("frames", "height", "width"), strict=True):
                if size not in (1, 2 * n - 1):
                    raise ValueError(f"bias table has {size} {name} offsets; expected 1 or {2 * n - 1} (2 x {n} - 1)")

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    def heads(self, hs: slice) -> AttentionBias:
        """The same bias for a slice of the heads (tensor and Ulysses parallelism)."""
        return AttentionBias(
            self.grid,
            None if self.table is None else self.table[hs],
            None if self.null_kv is None else self.null_kv[:, hs],
            self.text_mask,
            self.frame_lengths,
            None if self.null_slopes is None else self.null_slopes[hs],
        )


def video_positions(frame_ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(t, y, x) of every video token of the frames `frame_ids` in row order: (len(frame_ids) * h * w, 3) long."""
    s = torch.arange(h * w, device=frame_ids.device)
    t = frame_ids.long().repeat_interleave(h * w)
    return torch.stack([t, s.repeat(len(frame_ids)) // w, s.repeat(len(frame_ids)) % w], dim=1)


def relative_index(q_pos: torch.Tensor, k_pos: torch.Tensor, table_shape: tuple[int, ...]) -> torch.Tensor:
    """Flat index (Sq, Sk) into table.flatten(1) of each (query, key) video pair."""
    idx = torch.zeros(q_pos.shape[0], k_pos.shape[0], dtype=torch.long, device=q_pos.device)
    for d, size in enumerate(table_shape):
        idx = idx * size
        if size > 1:
            idx = idx + (q_pos[:, d, None] - k_pos[None, :, d]) + (size - 1) // 2
    return idx


def pair_bias(
    bias: AttentionBias, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None, k_text: tuple[int, int] | None
) -> torch.Tensor | None:
    """Additive bias (B | 1, H | 1, Sq, Sk) of queries at `q_pos` (None: text queries) against video keys at
    `k_pos`, or against the text keys [k_text[0], k_text[1]) when `k_pos` is None. None when nothing applies."""
    out = None
    if k_pos is None:
        if bias.text_mask is not None:
            keep = bias.text_mask[:, k_text[0] : k_text[1]]  # (B, Sk)
            out = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill(~keep, NEG_INF)
            out = out[:, None, None, :]
        return out
    if bias.table is not None and q_pos is not None:
        idx = relative_index(q_pos, k_pos, tuple(bias.table.shape[1:]))
        out = bias.table.flatten(1)[:, idx][None]  # (1, H, Sq, Sk)
    if bias.frame_lengths is not None:
        pad = k_pos[None, :, 0] >= bias.frame_lengths[:, None].to(k_pos.device)  # (B, Sk)
        mask = torch.zeros(pad.shape, dtype=torch.float32, device=pad.device).masked_fill(pad, NEG_INF)
        mask = mask[:, None, None, :]
        out = mask if out is None else out + mask.to(out.dtype)
    return out


def null_bias(slopes: torch.Tensor | None, q_pos: torch.Tensor | None, n: int, k0: int, k1: int):
    """(1, H, Sq, k1 - k0) ALiBi bias of video queries at `q_pos` against the null keys [k0, k1) of `n`:
    -slope * (t + n - m). None for text queries or without slopes."""
    if slopes is None or q_pos is None:
        return None
    m = torch.arange(k0, k1, device=q_pos.device)
    dist = (q_pos[:, 0, None] + n - m[None, :]).to(slopes.dtype)  # (Sq, k1 - k0)
    return (-slopes[:, None, None] * dist[None])[None]


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: AttentionBias | None,
    *,
    text_len: int,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Full softmax attention over [null kv | text | video] on one device. q, k, v (B, H, L + T*h*w, D): every
    frame of the video. Frame-causal: a video query in frame t sees text, null kv and frames <= t; text queries
    see null kv and text."""
    L = text_len
    B, H, S, D = q.shape
    grid = bias.grid if bias is not None else None
    scale = D**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    add = torch.zeros(1, 1, S, S, dtype=acc, device=q.device)
    if causal or bias is not None:
        T, h, w = grid if grid is not None else (None, None, None)
        if grid is None:
            raise ValueError("dense_attention: causal attention needs a bias object carrying the grid")
        pos = video_positions(torch.arange(T, device=q.device), h, w)
        if S != L + pos.shape[0]:
            raise ValueError(f"q has {S} tokens; expected text_len={L} + {T} frames x {h * w}")
        parts = [[None, None], [None, None]]  # [query text | video] x [key text | video]
        parts[0][0] = pair_bias(bias, None, None, (0, L)) if L else None
        parts[0][1] = pair_bias(bias, None, pos, None) if L else None
        parts[1][0] = pair_bias(bias, pos, None, (0, L)) if L else None
        parts[1][1] = pair_bias(bias, pos, pos, None)
        full = torch.zeros(B, H, S, S, dtype=acc, device=q.device)
        for qi, rows in enumerate((slice(0, L), slice(L, S))):
            for ki, cols in enumerate((slice(0, L), slice(L, S))):
                if parts[qi][ki] is not None:
                    full[:, :, rows, cols] = full[:, :, rows, cols] + parts[qi][ki].to(acc)
        if causal:
            fid = torch.cat([torch.full((L,), -1, device=q.device), pos[:, 0]])
            qf, kf = fid[:, None], fid[None, :]
            allowed = (kf == -1) | ((qf >= 0) & (kf <= qf))
            full = full.masked_fill(~allowed, NEG_INF)
        add = full
    if bias is not None and bias.null_kv is not None:
        n = bias.null_kv.shape[2]
        k = torch.cat([bias.null_kv[0].expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
        v = torch.cat([bias.null_kv[1].expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
        add = F.pad(add, (n, 0))
        if bias.null_slopes is not None and grid is not None:
            T, h, w = grid
            pos = video_positions(torch.arange(T, device=q.device), h, w)
            add[:, :, L:, :n] += null_bias(bias.null_slopes, pos, n, 0, n).to(add.dtype)  # add is (B, H, S, n + S) here
    return F.scaled_dot_product_attention(q, k, v, attn_mask=add.to(q.dtype), scale=scale)


def alibi_slopes(heads: int) -> list[float]:
    """Per-head ALiBi slopes (Press et al. 2022) as the seed computes them: the geometric sequence for the nearest
    lower power of two, then every other slope of the next power of two for the remaining heads."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    lower = 2 ** math.floor(math.log2(heads))
    return power_of_2(lower) + power_of_2(2 * lower)[0::2][: heads - lower]


def alibi_table(slopes: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(H, 2T-1, 1, 1): -slope * |frame distance|."""
    dt = torch.arange(-(num_frames - 1), num_frames, device=slopes.device).abs().to(slopes.dtype)
    return (-slopes[:, None] * dt[None])[:, :, None, None]


class ContinuousPositionBias(nn.Module):
    """Phenaki's continuous position bias (Swin v2, https://arxiv.org/abs/2111.09883): an MLP over the
    log-scaled relative (t, h, w) offsets -> one bias per head; evaluated on every offset of the grid."""

    def __init__(self, dim: int, heads: int, num_dims: int = 3, layers: int = 2, log_dist: bool = True):
        super().__init__()
        self.num_dims, self.log_dist = num_dims, log_dist
        widths = [num_dims] + [dim] * layers
        self.net = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.out = nn.Linear(dim, heads)

    def forward(self, grid: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(H, 2T-1, 2h-1, 2w-1) for num_dims=3; (H, 1, 2h-1, 2w-1) for num_dims=2 (spatial offsets only)."""
        sizes = [2 * n - 1 for n in grid]
        if self.num_dims == 2:
            sizes[0] = 1
        axes = [torch.arange(s, device=device) - (s - 1) // 2 for s in sizes]
        rel = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).to(dtype)  # (s_t, s_h, s_w, 3)
        rel = rel[..., 3 - self.num_dims :]
        if self.log_dist:
            rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        for layer in self.net:
            rel = F.leaky_relu(layer(rel), 0.1)
        return self.out(rel).permute(3, 0, 1, 2)  # (H, s_t, s_h, s_w)
