# All-gather attention: every rank receives all frame K/V once (one all-to-all with uneven splits, so no padding
# travels), attends its local queries to them, and in the backward sends each block's dK/dV contribution back to
# its owner (a reduce-scatter, again one uneven all-to-all). Simplest strategy, most memory: the gathered K/V
# of the whole sequence are kept for the backward.
from __future__ import annotations

import torch

from parallel.attention.blocks import TEXT_SOURCE, ForwardState, backward_items, text_block_items
from parallel.attention.kernels import acc_dtype
from parallel.attention.ring import RingSpec
from parallel.comm import all_to_all_tensors


def _gather_kv(k, v, spec: RingSpec) -> list[torch.Tensor]:
    L = spec.text_len
    B, H, _, D = k.shape
    kv = torch.stack([k[:, :, L:], v[:, :, L:]])  # (2, B, H, N_rank, D)
    shapes = [(2, B, H, spec.rows(j), D) for j in range(spec.size)]
    return all_to_all_tensors([kv] * spec.size, shapes, spec.group)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec):
        L = spec.text_len
        blocks = _gather_kv(k, v, spec)
        state = ForwardState.empty(q)
        state.run(q, k, v, text_block_items(L, spec.rows(spec.rank)), TEXT_SOURCE, spec.scale)
        for source, kv in enumerate(blocks):
            state.run(q, kv[0], kv[1], spec.items(source), source, spec.scale)
        out, lse = state.finalize(q.dtype)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse, *blocks)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *blocks = ctx.saved_tensors
        spec: RingSpec = ctx.spec
        L = spec.text_len
        B, H, _, D = k.shape
        f32 = dict(dtype=acc_dtype(q.dtype), device=q.device)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, **f32)
        dk_t, dv_t = torch.zeros(B, H, L, D, **f32), torch.zeros(B, H, L, D, **f32)
        backward_items(dout, q, k[:, :, :L], v[:, :, :L], out, lse, text_block_items(L, spec.rows(spec.rank)),
                       spec.scale, dq, dk_t, dv_t)  # fmt: skip
        contrib = []
        for source, kv in enumerate(blocks):
            acc = torch.zeros(kv.shape, **f32)  # (2, B, H, N_source, D)
            backward_items(dout, q, kv[0], kv[1], out, lse, spec.items(source), spec.scale, dq, acc[0], acc[1])
            contrib.append(acc)
        mine = (2, B, H, spec.rows(spec.rank), D)
        dkv = torch.stack(all_to_all_tensors(contrib, [mine] * spec.size, spec.group)).sum(0)
        dk = torch.cat([dk_t, dkv[0]], dim=2).to(k.dtype)
        dv = torch.cat([dv_t, dkv[1]], dim=2).to(v.dtype)
        return dq.to(q.dtype), dk, dv, None
