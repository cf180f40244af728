# All-gather attention: every rank receives all frame K/V once (one all-to-all with uneven splits, so no padding
# travels), attends its local queries to them, and in the backward sends each block's dK/dV contribution back to
# its owner (a reduce-scatter, again one uneven all-to-all). Simplest strategy, most memory: the gathered K/V
# of the whole sequence are kept for the backward.
from __future__ import annotations

import torch

from parallel.attention.blocks import (
    NULL_SOURCE,
    TEXT_SOURCE,
    ForwardState,
    backward_items,
    null_block_items,
    text_block_items,
)
from parallel.attention.kernels import acc_dtype
from parallel.attention.ring import RingSpec, bound_bias
from parallel.comm import all_to_all_tensors


def _gather_kv(k, v, spec: RingSpec) -> list[torch.Tensor]:
    L = spec.text_len
    B, H, _, D = k.shape
    kv = torch.stack([k[:, :, L:], v[:, :, L:]])  # (2, B, H, N_rank, D)
    shapes = [(2, B, H, spec.rows(j), D) for j in range(spec.size)]
    return all_to_all_tensors([kv] * spec.size, shapes, spec.group)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, null_kv, spec: RingSpec):
        L, n = spec.text_len, spec.rows(spec.rank)
        blocks = _gather_kv(k, v, spec)
        bias, null = bound_bias(spec, table, null_kv, slice(None), q.shape[0], q.dtype)
        state = ForwardState.empty(q)
        if null is not None:
            state.run(q, null[0], null[1], null_block_items(null.shape[3], L, n), NULL_SOURCE, spec.scale, bias)
        state.run(q, k, v, text_block_items(L, n), TEXT_SOURCE, spec.scale, bias)
        for source, kv in enumerate(blocks):
            state.run(q, kv[0], kv[1], spec.items(source), source, spec.scale, bias)
        out, lse = state.finalize(q.dtype)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse, table, null_kv, *blocks)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, table, null_kv, *blocks = ctx.saved_tensors
        spec: RingSpec = ctx.spec
        L, n = spec.text_len, spec.rows(spec.rank)
        B, H, _, D = k.shape
        f32 = dict(dtype=acc_dtype(q.dtype), device=q.device)
        bias, null = bound_bias(spec, table, null_kv, slice(None), B, q.dtype)
        dtable = torch.zeros(table.shape, **f32) if table is not None and ctx.needs_input_grad[3] else None
        dnull = None if null is None else torch.zeros(null.shape, **f32)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, **f32)
        dk_t, dv_t = torch.zeros(B, H, L, D, **f32), torch.zeros(B, H, L, D, **f32)
        backward_items(dout, q, k[:, :, :L], v[:, :, :L], out, lse, text_block_items(L, n), spec.scale, dq, dk_t,
                       dv_t, TEXT_SOURCE, bias)  # fmt: skip
        if null is not None:
            backward_items(dout, q, null[0], null[1], out, lse, null_block_items(null.shape[3], L, n), spec.scale,
                           dq, dnull[0], dnull[1], NULL_SOURCE, bias)  # fmt: skip
        contrib = []
        for source, kv in enumerate(blocks):
            acc = torch.zeros(kv.shape, **f32)  # (2, B, H, N_source, D)
            backward_items(dout, q, kv[0], kv[1], out, lse, spec.items(source), spec.scale, dq, acc[0], acc[1],
                           source, bias, dtable)  # fmt: skip
            contrib.append(acc)
        mine = (2, B, H, spec.rows(spec.rank), D)
        dkv = torch.stack(all_to_all_tensors(contrib, [mine] * spec.size, spec.group)).sum(0)
        dk = torch.cat([dk_t, dkv[0]], dim=2).to(k.dtype)
        dv = torch.cat([dv_t, dkv[1]], dim=2).to(v.dtype)
        gtable = None if dtable is None else dtable.to(table.dtype)
        gnull = None if dnull is None else dnull.sum(1).to(null_kv.dtype)
        return dq.to(q.dtype), dk, dv, gtable, gnull, None
