# Per-block attention kernels that return the log-sum-exp (LSE), their backward given the *global* out/LSE,
# and the one LSE-merge helper. Everything above this file (ring, Ulysses, all-gather) is built from these.
# The CUDA calls use what fake CUDA tensors support on a CPU-only build (narrow and pad, not Python indexing or
# copy_), so that tests/test_cuda_paths.py runs them on a machine without a GPU.
#
# Block results are combined with  lse = logaddexp(lse_a, lse_b),  out = w_a*out_a + w_b*out_b,
# w_x = exp(lse_x - lse) <= 1, in fp32 (derivation: ring-flash-attention's "update_out_and_lse",
# https://github.com/zhuzilin/ring-flash-attention/blob/main/ring_flash_attn/utils.py). -inf LSEs (rows with no
# visible key yet) merge correctly. The flash backward is exact for one block when handed the final (merged)
# out and LSE of the whole row, because P_block = exp(S_block - lse_global).
from __future__ import annotations

import torch

_NEG_INF = float("-inf")
_aten = torch.ops.aten


def _cpu_forward(q, k, v, scale, bias):
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, scale, bias):
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


def _cuda_flash_ok(q: torch.Tensor, bias) -> bool:
    return bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _cuda_bias(bias, q, k):
    """The memory-efficient kernel reads the bias directly: a full (B, H, Sq, Sk) view whose rows start 16-byte
    aligned (F.scaled_dot_product_attention pads the same way before calling it)."""
    if bias is None:
        return None
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    sk = shape[-1]
    pad = -sk % 16
    return torch.nn.functional.pad(bias.to(q.dtype).expand(shape), (0, pad)).narrow(-1, 0, sk)  # row stride sk + pad


def _cuda_forward(q, k, v, scale, bias):
    bias = _cuda_bias(bias, q, k)
    if _cuda_flash_ok(q, bias):
        out, lse, *_ = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse
    out, lse, _, _ = _aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)
    return out, lse.narrow(-1, 0, q.shape[-2])  # efficient attention pads the LSE to a multiple of 32


def _cuda_backward(dout, q, k, v, out, lse, scale, bias):
    bias = _cuda_bias(bias, q, k)
    sq, sk = q.shape[-2], k.shape[-2]
    if _cuda_flash_ok(q, bias):
        empty = torch.empty(0, device=q.device)
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, empty, empty, sq, sk, 0.0, False, empty, empty, scale=scale
        )
    pad = (-sq) % 32
    lse_p = torch.nn.functional.pad(lse, (0, pad)) if pad else lse
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, bias, out, lse_p.contiguous(), seed, seed, 0.0, [True, True, True, False], False, scale=scale
    )
    return dq, dk, dv


def _math_forward(q, k, v, scale, bias):
    """Unfused attention in `acc_dtype` (fp32, or fp64 for fp64 inputs): the fallback and the reference."""
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if bias is not None:
        s = s + bias.to(acc)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.matmul(p, v.to(acc)).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, scale, bias):
    acc = acc_dtype(q.dtype)
    qf, kf, vf, do = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # (B, H, Sq, Sk) with the global LSE
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    delta = (do * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O) of the final output
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of partial outputs, LSEs and gradients: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pick(device: torch.device, dtype: torch.dtype):
    if device.type == "cpu":
        return _cpu_forward, _cpu_backward
    if device.type == "cuda" and dtype != torch.float64:
        return _cuda_forward, _cuda_backward
    return _math_forward, _math_backward


def _fix_masked_rows(lse: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The fused kernels report LSE=0 (not -inf) for a row whose keys are all masked; that would be a real weight.
    if bias is None:
        return lse
    dead = torch.isneginf(bias).all(dim=-1)  # (..., Sq)
    return lse.masked_fill(dead.expand_as(lse), _NEG_INF) if dead.any() else lse


def block_forward(q, k, v, scale: float, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Sq, D) over one key block k, v (B, H, Sk, D) with an optional additive bias
    broadcastable to (B, H, Sq, Sk). Returns out (B, H, Sq, D) in q's dtype and LSE (B, H, Sq) in `acc_dtype`."""
    fwd, _ = _pick(q.device, q.dtype)
    out, lse = fwd(q, k, v, scale, bias)
    return out, _fix_masked_rows(lse.to(acc_dtype(q.dtype)), bias)


def block_backward(dout, q, k, v, out, lse, scale: float, bias: torch.Tensor | None = None):
    """Gradients of one block given the final out (B, H, Sq, D) and LSE (B, H, Sq) of the whole rows."""
    _, bwd = _pick(q.device, q.dtype)
    if bias is not None:
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # dead rows: P = exp(-inf - 0) = 0, no NaN
    return bwd(dout, q, k, v, out, lse, scale, bias)


def block_bias_grad(dout, q, k, v, out, lse, scale: float, bias: torch.Tensor) -> torch.Tensor:
    """Gradient of the loss w.r.t. one block's additive bias, dS = P * (dP - rowsum(dO * O)), (B, H, Sq, Sk) in
    `acc_dtype`, given the final out and LSE of the whole rows (the fused kernels do not return it)."""
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale + bias.to(acc)
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # (B, H, Sq, Sk)
    dp = torch.matmul(dout.to(acc), v.to(acc).transpose(-1, -2))
    delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    return p * (dp - delta)


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: (acc_out, acc_lse) <- merge of itself and a block result (accumulators in `acc_dtype`)."""
    new = torch.logaddexp(acc_lse, lse)
    safe = torch.where(torch.isneginf(new), 0.0, new)
    w_acc = torch.exp(acc_lse - safe).unsqueeze(-1)  # (B, H, S, 1), 0 where acc_lse = -inf
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    acc_out.mul_(w_acc).add_(out.to(acc_out.dtype) * w_new)
    acc_lse.copy_(new)
