# Ulysses (DeepSpeed-Ulysses) axis switch: all_to_all_single turns "all heads, my frames" into "my heads, the
# frames of the whole Ulysses group" before attention, and back after it. Heads need not divide the group
# (30 heads on 4 ranks -> 8, 8, 7, 7) and members may hold different frame counts: uneven splits, no padding.
#
# Text (replicated): going in, each member simply slices its heads from its own copy (no traffic); its gradient is
# that head slice (partial convention). Coming out, the text rows of every member's heads travel in the same
# all-to-all as the frames, so every member ends with all heads; in the backward the members' partial text
# gradients of each head slice are summed at the member that computed those heads.
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpdit.partition import even_split
from parallel.comm import all_to_all_tensors


@dataclass(frozen=True)
class UlyssesSpec:
    group: dist.ProcessGroup
    rank: int
    size: int
    num_heads: int
    text_len: int
    member_rows: tuple[int, ...]  # frame rows (tokens) held by each member, in member order

    @property
    def heads(self) -> list[int]:
        return even_split(self.num_heads, self.size)

    def head_slice(self, j: int) -> slice:
        h = self.heads
        return slice(sum(h[:j]), sum(h[: j + 1]))

    def row_offsets(self) -> list[int]:
        off = [self.text_len]
        for n in self.member_rows:
            off.append(off[-1] + n)
        return off


def seq_to_head(x: torch.Tensor, spec: UlyssesSpec) -> torch.Tensor:
    """(..., H, L + N_me, D) -> (..., h_me, L + sum(N_j), D)."""
    L, me = spec.text_len, spec.rank
    frames = x[..., L:, :]
    sends = [frames[..., spec.head_slice(j), :, :].contiguous() for j in range(spec.size)]
    lead = tuple(x.shape[:-3])
    D = x.shape[-1]
    shapes = [(*lead, spec.heads[me], spec.member_rows[j], D) for j in range(spec.size)]
    recv = all_to_all_tensors(sends, shapes, spec.group)
    return torch.cat([x[..., spec.head_slice(me), :L, :], *recv], dim=-2)


def seq_to_head_backward(g: torch.Tensor, spec: UlyssesSpec) -> torch.Tensor:
    """(..., h_me, L + sum(N_j), D) -> (..., H, L + N_me, D); text gradient only in this member's heads."""
    L, me = spec.text_len, spec.rank
    off = spec.row_offsets()
    sends = [g[..., off[j] : off[j + 1], :].contiguous() for j in range(spec.size)]
    lead, D = tuple(g.shape[:-3]), g.shape[-1]
    shapes = [(*lead, spec.heads[j], spec.member_rows[me], D) for j in range(spec.size)]
    frames = torch.cat(all_to_all_tensors(sends, shapes, spec.group), dim=-3)
    text = g.new_zeros((*lead, spec.num_heads, L, D))
    text[..., spec.head_slice(me), :, :] = g[..., :L, :]
    return torch.cat([text, frames], dim=-2)


def head_to_seq(y: torch.Tensor, spec: UlyssesSpec) -> torch.Tensor:
    """(B, h_me, L + sum(N_j), D) -> (B, H, L + N_me, D); text rows of all heads gathered in the same call."""
    L, me = spec.text_len, spec.rank
    off = spec.row_offsets()
    sends = [torch.cat([y[:, :, :L], y[:, :, off[j] : off[j + 1]]], dim=2) for j in range(spec.size)]
    B, _, _, D = y.shape
    shapes = [(B, spec.heads[j], L + spec.member_rows[me], D) for j in range(spec.size)]
    return torch.cat(all_to_all_tensors(sends, shapes, spec.group), dim=1)


def head_to_seq_backward(g: torch.Tensor, spec: UlyssesSpec) -> torch.Tensor:
    """(B, H, L + N_me, D) -> (B, h_me, L + sum(N_j), D): text partials of my heads summed over members."""
    L, me = spec.text_len, spec.rank
    sends = [g[:, spec.head_slice(j)].contiguous() for j in range(spec.size)]
    B, _, _, D = g.shape
    shapes = [(B, spec.heads[me], L + spec.member_rows[j], D) for j in range(spec.size)]
    recv = all_to_all_tensors(sends, shapes, spec.group)
    text = torch.stack([r[:, :, :L] for r in recv]).sum(0)
    return torch.cat([text, *[r[:, :, L:] for r in recv]], dim=2)


class SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: UlyssesSpec):
        ctx.spec = spec
        return seq_to_head(x, spec)

    @staticmethod
    def backward(ctx, g):
        return seq_to_head_backward(g.contiguous(), ctx.spec), None


class HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, spec: UlyssesSpec):
        ctx.spec = spec
        return head_to_seq(y, spec)

    @staticmethod
    def backward(ctx, g):
        return head_to_seq_backward(g.contiguous(), ctx.spec), None
