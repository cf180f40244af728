# All-gather attention: every rank receives all frame K/V once (one all-to-all with uneven splits, so no padding
# travels), attends its local queries to them, and in the backward sends each block's dK/dV contribution back to
# its owner (a reduce-scatter, again one uneven all-to-all). Simplest strategy, most memory: the gathered K/V
# of the whole sequence are kept for the backward.
from __future__ import annotations

import torch

from parallel.attention.blocks import backward_items
from parallel.attention.kernels import acc_dtype
from parallel.attention.ring import BlockSpec, bound_bias, local_keys_backward, local_keys_forward
from parallel.comm import all_to_all_tensors


def _gather_kv(k, v, spec: BlockSpec) -> list[torch.Tensor]:
    L = spec.text_len
    B, H, _, D = k.shape
    kv = torch.stack([k[:, :, L:], v[:, :, L:]])  # (2, B, H, N_rank, D)
    shapes = [(2, B, H, spec.rows(j), D) for j in range(spec.size)]
    return all_to_all_tensors([kv] * spec.size, shapes, spec.group)


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, null_kv, spec: BlockSpec):
        blocks = _gather_kv(k, v, spec)
        bias, null = bound_bias(spec, table, null_kv, slice(None), q.shape[0], q.dtype)
        state = local_keys_forward(q, k, v, spec, bias, null)
        for source, kv in enumerate(blocks):
            state.run(q, kv[0], kv[1], spec.items(source), source, spec.scale, bias)
        out, lse = state.finalize(q.dtype)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse, table, null_kv, *blocks)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, table, null_kv, *blocks = ctx.saved_tensors
        spec: BlockSpec = ctx.spec
        L = spec.text_len
        B, H, _, D = k.shape
        f32 = dict(dtype=acc_dtype(q.dtype), device=q.device)
        bias, null = bound_bias(spec, table, null_kv, slice(None), B, q.dtype)
        dtable = torch.zeros(table.shape, **f32) if table is not None and ctx.needs_input_grad[3] else None
        dnull = None if null is None else torch.zeros(null.shape, **f32)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, **f32)
        dkv_text = torch.zeros(2, B, H, L, D, **f32)
        local_keys_backward(dout, q, k, v, out, lse, spec, dq=dq, dkv_text=dkv_text, dnull=dnull, bias=bias, null=null)
        contrib = []
        for source, kv in enumerate(blocks):
            acc = torch.zeros(kv.shape, **f32)  # (2, B, H, N_source, D)
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
            contrib.append(acc)
        mine = (2, B, H, spec.rows(spec.rank), D)
        dkv = torch.stack(all_to_all_tensors(contrib, [mine] * spec.size, spec.group)).sum(0)
        dk = torch.cat([dkv_text[0], dkv[0]], dim=2).to(k.dtype)
        dv = torch.cat([dkv_text[1], dkv[1]], dim=2).to(v.dtype)
        gtable = None if dtable is None else dtable.to(table.dtype)
        gnull = None if dnull is None else dnull.sum(1).to(null_kv.dtype)
        return dq.to(q.dtype), dk, dv, gtable, gnull, None
