# Ring attention over the frame-token axis: frame K/V blocks rotate around the ring with batch_isend_irecv, the
# next block's transfer overlapping the current block's compute. In the backward, K/V rotate again and a dK/dV
# accumulator follows each block one step behind, gathering every other rank's contribution, and arrives at the
# owner after R-1 hops (forward: R-1 K/V hops; backward: R-1 K/V hops + R-1 dK/dV hops, the minimum for a ring).
# Blocks may have different lengths (uneven frames); fully invisible
# frame-causal blocks are skipped (their transfer still happens: the ring never stalls).
#
# The text keys are replicated, so they never travel: every rank attends to its own copy. Text queries' dout is
# the rank's partial gradient (see parallel/sequence.py); the backward is linear in dout, so the partial dq/dk/dv
# of the text rows and the block contributions sum over ranks to the true gradients.
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpdit.partition import split_ranges
from parallel.attention.bias import BlockBias
from parallel.attention.blocks import (
    NULL_SOURCE,
    TEXT_SOURCE,
    ForwardState,
    backward_items,
    frame_block_items,
    null_block_items,
    text_block_items,
)
from parallel.attention.kernels import acc_dtype
from parallel.comm import ring_exchange, wait_all
from parallel.sequence import Segment


@dataclass(frozen=True)
class BlockSpec:
    """What one rank needs to run the blocks of a strategy over a ring of `size` members (1: no ring).
    `blocks[j]` are the frame segments held by ring member j, in row order; the local q/k/v rows are
    [text | blocks[rank]]."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    blocks: tuple[tuple[Segment, ...], ...]
    text_len: int
    tokens_per_frame: int
    causal: bool
    scale: float
    head_chunks: int = 1  # run the ring once per chunk of heads: rotating buffers shrink by this factor
    bias: BlockBias | None = None  # positions and masks of this rank's blocks (tensors bound per call)

    def rows(self, member: int) -> int:
        return sum(b - a for a, b in self.blocks[member]) * self.tokens_per_frame

    def items(self, source: int):
        return frame_block_items(
            list(self.blocks[self.rank]), list(self.blocks[source]), self.text_len, self.tokens_per_frame, self.causal
        )


def local_keys_forward(q, k, v, spec: BlockSpec, bias: BlockBias | None, null) -> ForwardState:
    """Every strategy's start: this rank's queries attend to the keys every rank holds itself - the null keys/values
    (2, B, H, n, D) or None, and the replicated text rows of k/v. Frame blocks are merged into the state next."""
    L, n = spec.text_len, spec.rows(spec.rank)
    state = ForwardState.empty(q)
    if null is not None:
        state.run(q, null[0], null[1], null_block_items(null.shape[3], L, n), NULL_SOURCE, spec.scale, bias)
    state.run(q, k, v, text_block_items(L, n), TEXT_SOURCE, spec.scale, bias)
    return state


def local_keys_backward(dout, q, k, v, out, lse, spec: BlockSpec, *, dq, dkv_text, dnull, bias, null) -> None:
    """The gradients of local_keys_forward's part, accumulated into dq, dkv_text (2, B, H, L, D) and dnull (like
    `null`)."""
    L, n = spec.text_len, spec.rows(spec.rank)
    backward_items(
        dout,
        q,
        k[:, :, :L],
        v[:, :, :L],
        out,
        lse,
        text_block_items(L, n),
        spec.scale,
        dq=dq,
        dk=dkv_text[0],
        dv=dkv_text[1],
        source=TEXT_SOURCE,
        bias=bias,
    )
    if null is not None:
        backward_items(
            dout,
            q,
            null[0],
            null[1],
            out,
            lse,
            null_block_items(null.shape[3], L, n),
            spec.scale,
            dq=dq,
            dk=dnull[0],
            dv=dnull[1],
            source=NULL_SOURCE,
            bias=bias,
        )


def ring_forward(q, k, v, spec: BlockSpec, bias: BlockBias | None = None, null=None):
    """q, k, v: (B, H, L + N_rank, D); `bias` the BlockBias with its tensors, `null` (2, B, H, n, D) null keys and
    values. Returns out (same shape, q's dtype) and LSE (B, H, L + N_rank) fp32."""
    L = spec.text_len
    B, H, _, D = k.shape
    state = local_keys_forward(q, k, v, spec, bias, null)
    kv = torch.stack([k[:, :, L:], v[:, :, L:]])  # (2, B, H, N_rank, D) contiguous: one message per hop
    for step in range(spec.size):
        source = (spec.rank - step) % spec.size
        if step < spec.size - 1:
            nxt = (source - 1) % spec.size
            recv, reqs = ring_exchange(kv, (2, B, H, spec.rows(nxt), D), spec.group, tag=step)
        state.run(q, kv[0], kv[1], spec.items(source), source, spec.scale, bias)
        if step < spec.size - 1:
            wait_all(reqs)
            kv = recv
    return state.finalize(q.dtype)


def ring_backward(
    dout, q, k, v, out, lse, spec: BlockSpec, *, dq=None, dkv=None, bias=None, null=None, dtable=None, dnull=None
):
    """Gradients of ring_forward. `dq` (like q) and `dkv` (2, *k.shape) are zero accumulators in acc_dtype to
    add into (views of the caller's buffers are fine); allocated when None. `dtable` (like the bias table) and
    `dnull` (like `null`) receive the partial gradients of the bias table and the null keys/values when given."""
    L = spec.text_len
    B, H, _, D = k.shape
    acc_kw = dict(dtype=acc_dtype(q.dtype), device=q.device)
    dq = torch.zeros(q.shape, **acc_kw) if dq is None else dq
    dkv = torch.zeros(2, *k.shape, **acc_kw) if dkv is None else dkv  # this rank's dK/dV: [text | own frames]
    local_keys_backward(
        dout, q, k, v, out, lse, spec, dq=dq, dkv_text=dkv[:, :, :, :L], dnull=dnull, bias=bias, null=null
    )
    kv = torch.stack([k[:, :, L:], v[:, :, L:]])  # (2, B, H, N_rank, D)
    acc_reqs: list = []
    acc_recv = None
    for step in range(spec.size):
        source = (spec.rank - step) % spec.size
        nxt = (source - 1) % spec.size
        if step < spec.size - 1:
            kv_recv, kv_reqs = ring_exchange(kv, (2, B, H, spec.rows(nxt), D), spec.group, tag=2 * step)
        if step == 0:  # own block: the contribution stays here
            own = dict(dk=dkv[0, :, :, L:], dv=dkv[1, :, :, L:], source=source, bias=bias, dtable=dtable)
            backward_items(dout, q, kv[0], kv[1], out, lse, spec.items(source), spec.scale, dq=dq, **own)
        else:
            # This rank's contribution to `source`, plus what the ranks after the owner gathered so far; then on
            # to the next rank. The accumulator of a block starts one rank after its owner and reaches the owner
            # after R-1 hops, like the K/V block itself.
            acc = torch.zeros(2, B, H, spec.rows(source), D, **acc_kw)
            backward_items(
                dout,
                q,
                kv[0],
                kv[1],
                out,
                lse,
                spec.items(source),
                spec.scale,
                dq=dq,
                dk=acc[0],
                dv=acc[1],
                source=source,
                bias=bias,
                dtable=dtable,
            )
            if step > 1:
                wait_all(acc_reqs)
                acc += acc_recv
            acc_recv, acc_reqs = ring_exchange(acc, (2, B, H, spec.rows(nxt), D), spec.group, tag=2 * step + 1)
        if step < spec.size - 1:
            wait_all(kv_reqs)
            kv = kv_recv
    if spec.size > 1:  # the last hop delivered our own block's accumulator
        wait_all(acc_reqs)
        dkv[:, :, :, L:] += acc_recv
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _head_slices(num_heads: int, chunks: int) -> list[slice]:
    return [slice(a, b) for a, b in split_ranges(num_heads, max(1, min(chunks, num_heads)))]


def bound_bias(spec: BlockSpec, table, null_kv, hs: slice, batch: int, dtype: torch.dtype):
    """(BlockBias with the table of heads `hs`, null keys/values (2, B, h, n, D) in `dtype`) for one ring pass."""
    bias = None if spec.bias is None else spec.bias.with_tensors(None if table is None else table[hs], None, hs)
    null = None
    if null_kv is not None:
        null = null_kv[:, hs].to(dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1).contiguous()
    return bias, null


class BlockwiseAttention(torch.autograd.Function):
    """The block engine of every strategy but allgather: blockwise attention of this rank's queries over the keys of
    `spec.size` ring members (one member: the local path, and the ring of one after Ulysses' all-to-all), run once
    per chunk of heads (`spec.head_chunks`): the K/V blocks, dK/dV accumulators and
    kernel scratch in flight are 1/chunks of the whole; bytes on the wire are unchanged. `table` (H, ...) and
    `null_kv` (2, H, n, D) are the bias table and null keys/values (None without), differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, table, null_kv, spec: BlockSpec):
        slices = _head_slices(q.shape[1], spec.head_chunks)
        if len(slices) == 1:  # no copy into a preallocated output
            out, lse = ring_forward(q, k, v, spec, *bound_bias(spec, table, null_kv, slices[0], q.shape[0], q.dtype))
        else:
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:-1], dtype=acc_dtype(q.dtype), device=q.device)
            for hs in slices:
                bias, null = bound_bias(spec, table, null_kv, hs, q.shape[0], q.dtype)
                out[:, hs], lse[:, hs] = ring_forward(q[:, hs], k[:, hs], v[:, hs], spec, bias, null)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse, table, null_kv)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, table, null_kv = ctx.saved_tensors
        spec: BlockSpec = ctx.spec
        acc = dict(dtype=acc_dtype(q.dtype), device=q.device)
        dq = torch.zeros(q.shape, **acc)
        dkv = torch.zeros(2, *k.shape, **acc)
        dtable = torch.zeros(table.shape, **acc) if table is not None and ctx.needs_input_grad[3] else None
        dnull = None
        if null_kv is not None:
            dnull = torch.zeros(2, q.shape[0], *null_kv.shape[1:], **acc)  # (2, B, H, n, D)
        for hs in _head_slices(q.shape[1], spec.head_chunks):  # each pass accumulates into its head slice
            bias, null = bound_bias(spec, table, null_kv, hs, q.shape[0], q.dtype)
            ring_backward(
                dout[:, hs],
                q[:, hs],
                k[:, hs],
                v[:, hs],
                out[:, hs],
                lse[:, hs],
                spec,
                dq=dq[:, hs],
                dkv=dkv[:, :, hs],
                bias=bias,
                null=null,
                dtable=None if dtable is None else dtable[hs],
                dnull=None if dnull is None else dnull[:, :, hs],
            )
        gtable = None if dtable is None else dtable.to(table.dtype)
        gnull = None if dnull is None else dnull.sum(1).to(null_kv.dtype)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), gtable, gnull, None
