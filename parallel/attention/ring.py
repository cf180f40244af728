# Ring attention over the frame-token axis: frame K/V blocks rotate around the ring with batch_isend_irecv, the
# next block's transfer overlapping the current block's compute. In the backward, K/V rotate again and a dK/dV
# accumulator travels with each block, gathering every rank's contribution, and one last hop returns it to its
# owner (R-1 K/V hops + R dK/dV hops). Blocks may have different lengths (uneven frames); fully invisible
# frame-causal blocks are skipped (their transfer still happens: the ring never stalls).
#
# The text keys are replicated, so they never travel: every rank attends to its own copy. Text queries' dout is
# the rank's partial gradient (see parallel/sequence.py); the backward is linear in dout, so the partial dq/dk/dv
# of the text rows and the block contributions sum over ranks to the true gradients.
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.attention.blocks import TEXT_SOURCE, ForwardState, backward_items, frame_block_items, text_block_items
from parallel.attention.kernels import acc_dtype
from parallel.comm import ring_exchange, wait_all
from parallel.sequence import Segment


@dataclass(frozen=True)
class RingSpec:
    """What one rank needs to run the ring. `blocks[j]` are the frame segments held by ring member j, in row
    order; the local q/k/v rows are [text | blocks[rank]]."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    blocks: tuple[tuple[Segment, ...], ...]
    text_len: int
    tokens_per_frame: int
    causal: bool
    scale: float

    def rows(self, member: int) -> int:
        return sum(b - a for a, b in self.blocks[member]) * self.tokens_per_frame

    def items(self, source: int):
        return frame_block_items(
            list(self.blocks[self.rank]), list(self.blocks[source]), self.text_len, self.tokens_per_frame, self.causal
        )


def ring_forward(q, k, v, spec: RingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (B, H, L + N_rank, D). Returns out (same shape, q's dtype) and LSE (B, H, L + N_rank) fp32."""
    L = spec.text_len
    B, H, _, D = k.shape
    state = ForwardState.empty(q, L)
    state.run(q, k, v, text_block_items(L, spec.rows(spec.rank)), TEXT_SOURCE, spec.scale)
    kv = torch.stack([k[:, :, L:], v[:, :, L:]])  # (2, B, H, N_rank, D) contiguous: one message per hop
    for step in range(spec.size):
        source = (spec.rank - step) % spec.size
        if step < spec.size - 1:
            nxt = (source - 1) % spec.size
            recv, reqs = ring_exchange(kv, (2, B, H, spec.rows(nxt), D), spec.group, tag=step)
        state.run(q, kv[0], kv[1], spec.items(source), source, spec.scale)
        if step < spec.size - 1:
            wait_all(reqs)
            kv = recv
    return state.finalize(q.dtype)


def ring_backward(dout, q, k, v, out, lse, spec: RingSpec):
    L = spec.text_len
    B, H, _, D = k.shape
    f32 = dict(dtype=acc_dtype(q.dtype), device=q.device)
    dq = torch.zeros(q.shape, **f32)
    dk_t = torch.zeros(B, H, L, D, **f32)
    dv_t = torch.zeros(B, H, L, D, **f32)
    dout = dout.contiguous()
    items = text_block_items(L, spec.rows(spec.rank))
    backward_items(dout, q, k[:, :, :L], v[:, :, :L], out, lse, items, spec.scale, dq, dk_t, dv_t)
    kv = torch.stack([k[:, :, L:], v[:, :, L:]])  # (2, B, H, N_rank, D)
    dkv_reqs: list = []
    dkv_recv = None
    for step in range(spec.size):
        source = (spec.rank - step) % spec.size
        nxt = (source - 1) % spec.size
        if step < spec.size - 1:
            kv_recv, kv_reqs = ring_exchange(kv, (2, B, H, spec.rows(nxt), D), spec.group, tag=2 * step)
        acc = torch.zeros(2, B, H, spec.rows(source), D, **f32)  # this rank's dK/dV contribution to `source`
        backward_items(dout, q, kv[0], kv[1], out, lse, spec.items(source), spec.scale, dq, acc[0], acc[1])
        if step > 0:
            wait_all(dkv_reqs)
            acc += dkv_recv  # the contributions gathered so far by the ranks before us
        if spec.size > 1:  # pass it on; the last hop delivers each accumulator to its owner
            dkv_recv, dkv_reqs = ring_exchange(acc, (2, B, H, spec.rows(nxt), D), spec.group, tag=2 * step + 1)
        if step < spec.size - 1:
            wait_all(kv_reqs)
            kv = kv_recv
    if spec.size > 1:
        wait_all(dkv_reqs)
        acc = dkv_recv
    dk = torch.cat([dk_t, acc[0]], dim=2).to(k.dtype)
    dv = torch.cat([dv_t, acc[1]], dim=2).to(v.dtype)
    return dq.to(q.dtype), dk, dv


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec):
        out, lse = ring_forward(q, k, v, spec)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None
