# The dispatch of context_parallel_attention (the package's entry point, parallel/attention/__init__.py): which
# strategy runs, the specs its engines take, and the defaults of the knobs that bound their memory.
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from cpdit.attn_bias import AttentionBias
from parallel.attention.allgather import AllGatherAttention
from parallel.attention.bias import BlockBias
from parallel.attention.ring import BlockSpec, BlockwiseAttention
from parallel.attention.ulysses import HeadToSeq, SeqToHead, UlyssesSpec
from parallel.sequence import SequencePlan

STRATEGIES = ("auto", "ring", "ulysses", "usp", "allgather")
# Ring passes per attention call (over chunks of heads, capped at the head count). Context parallelism exists to
# save memory: 8 passes cut the ring's in-flight buffers to an eighth for the price of 8x more (smaller) messages,
# which at long sequences costs no time (bench/README.md: 0.29x of cp=1's working set at cp=4, as fast as 1 pass).
DEFAULT_RING_HEAD_CHUNKS = 8
# ...but a small model's blocks are tiny and its ring is latency-bound: below this many bytes of local K + V the
# default is one pass (the default job's attention: 0.5 MiB; bench/attention.py's S=16384: 64 MiB).
CHUNK_ABOVE_BYTES = 4 << 20


def head_chunks_for(kv_bytes: int) -> int:
    """The rule, the only one (parallel/memory_model.py predicts with it): ring passes when `head_chunks` is not
    given, DEFAULT_RING_HEAD_CHUNKS for K + V blocks of at least CHUNK_ABOVE_BYTES, else 1."""
    return DEFAULT_RING_HEAD_CHUNKS if kv_bytes >= CHUNK_ABOVE_BYTES else 1


def default_head_chunks(k: torch.Tensor) -> int:
    """`head_chunks_for` the K + V blocks of `k`'s shape and dtype."""
    return head_chunks_for(2 * k.numel() * k.element_size())


BIAS_BLOCK_BYTES = 32 << 20  # default bound of one kernel call's bias block (and of its probabilities' recompute)


def default_bias_rows(plan: SequencePlan, heads: int, num_null: int) -> int:
    """Query rows per biased kernel call so that a (heads, rows, keys) fp32 block stays within BIAS_BLOCK_BYTES for
    the largest key block of the sequence (all frames after an all-to-all; at least one frame's tokens)."""
    keys = max(plan.num_frames * plan.tokens_per_frame, plan.text_len, num_null, 1)
    return max(plan.tokens_per_frame, BIAS_BLOCK_BYTES // (4 * heads * keys))


def resolve_strategy(strategy: str, plan: SequencePlan, num_heads: int) -> str:
    """The concrete strategy for this plan; raises ValueError naming the knob when it cannot run."""
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel.attention={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if plan.cp_size == 1:
        return "local"
    U, R, cp = plan.ulysses_size, plan.ring_size, plan.cp_size
    if strategy == "auto":
        if U > 1 and R > 1 and num_heads >= U:
            return "usp"
        if U == cp and num_heads >= cp:
            return "ulysses"
        return "ring"
    if strategy == "ulysses" and num_heads < cp:
        raise ValueError(
            f"parallel.attention='ulysses' splits heads over all cp_size={cp} ranks but there are only "
            f"{num_heads} heads; use 'ring' or 'usp' with parallel.ulysses_size <= {num_heads}"
        )
    if strategy == "usp":
        if U == 1 or R == 1:
            raise ValueError(
                f"parallel.attention='usp' needs ulysses_size > 1 and a ring > 1 (ulysses_size={U}, "
                f"ring={R}); set parallel.ulysses_size to a proper divisor of cp_size={cp}, or use ring/ulysses"
            )
        if num_heads < U:
            raise ValueError(f"parallel.ulysses_size={U} exceeds the {num_heads} heads; lower ulysses_size")
    return strategy


def _block_spec(
    plan: SequencePlan,
    mode: str,
    causal: bool,
    scale: float,
    head_chunks: int = 1,
    bias: AttentionBias | None = None,
    bias_rows: int = 0,
) -> BlockSpec:
    """mode: "ring" (ring over all cp ranks), "ulysses" (a ring of one after the all-to-all), "usp", "local"."""
    tpf, L = plan.tokens_per_frame, plan.text_len
    if mode in ("ring", "local"):
        blocks = tuple(tuple(plan.local_segments(c)) for c in range(plan.cp_size))
        group, rank, size = (plan.cp_group, plan.cp_rank, plan.cp_size) if mode == "ring" else (None, 0, 1)
        blocks = blocks if mode == "ring" else (blocks[plan.cp_rank],)
    else:
        U = plan.ulysses_size if mode == "usp" else plan.cp_size
        size = plan.cp_size // U
        blocks = tuple(
            tuple(s for c in range(j * U, (j + 1) * U) for s in plan.local_segments(c)) for j in range(size)
        )  # ring member j holds the frames of its whole Ulysses group
        group, rank = (None, 0) if size == 1 else (plan.ring_group, plan.ring_rank)
    bb = None
    if bias is not None:  # positions and masks; the table and null kv are bound per ring pass (ring.bound_bias)
        num_null = 0 if bias.null_kv is None else bias.null_kv.shape[2]
        bb = BlockBias(replace(bias, table=None, null_kv=None), blocks, rank, L, num_null, bias_rows)
    chunks = head_chunks if size > 1 else 1
    return BlockSpec(group, rank, size, blocks, L, tpf, causal, scale, chunks, bb)


def _ulysses_spec(plan: SequencePlan, mode: str, num_heads: int) -> UlyssesSpec:
    """mode: "ulysses" (all-to-all over all cp ranks) or "usp" (over cp_ulysses)."""
    tpf = plan.tokens_per_frame
    if mode == "ulysses":
        rows = tuple(plan.num_local_frames(c) * tpf for c in range(plan.cp_size))
        return UlyssesSpec(plan.cp_group, plan.cp_rank, plan.cp_size, num_heads, plan.text_len, rows)
    U, r = plan.ulysses_size, plan.ring_rank
    rows = tuple(plan.num_local_frames(r * U + j) * tpf for j in range(U))
    return UlyssesSpec(plan.ulysses_group, plan.ulysses_rank, U, num_heads, plan.text_len, rows)


def _check_bias(bias: AttentionBias, plan: SequencePlan, q: torch.Tensor) -> None:
    T, h, w = bias.grid
    if T != plan.num_frames or h * w != plan.tokens_per_frame:
        raise ValueError(
            f"bias grid {bias.grid} does not match the plan ({plan.num_frames} frames x {plan.tokens_per_frame} "
            "tokens per frame)"
        )
    if bias.table is not None and bias.table.shape[0] != q.shape[1]:
        raise ValueError(f"bias table has {bias.table.shape[0]} heads, q has {q.shape[1]}")
    if bias.null_kv is not None and (bias.null_kv.shape[1] != q.shape[1] or bias.null_kv.shape[3] != q.shape[3]):
        raise ValueError(f"null_kv {tuple(bias.null_kv.shape)} must be (2, {q.shape[1]}, n, {q.shape[3]})")
    if bias.null_slopes is not None and (bias.null_kv is None or bias.null_slopes.shape != (q.shape[1],)):
        raise ValueError(f"null_slopes needs null_kv and one slope per head ({q.shape[1]})")
    if bias.text_mask is not None and tuple(bias.text_mask.shape) != (q.shape[0], plan.text_len):
        raise ValueError(f"text_mask {tuple(bias.text_mask.shape)} must be (B={q.shape[0]}, L={plan.text_len})")


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SequencePlan,
    *,
    causal: bool = False,
    strategy: str = "auto",
    scale: float | None = None,
    head_chunks: int | None = None,
    bias: AttentionBias | None = None,
    bias_rows: int | None = None,
) -> torch.Tensor:
    """Attention of this rank's tokens over the whole context-parallel sequence.

    Args:
        q, k, v: (B, H, L + T_local * tpf, D), laid out as `plan.shard` does.
        plan: the SequencePlan of this sequence.
        causal: frame-causal (a query in frame t sees the text and frames <= t; text sees text only).
        strategy: auto, ring, ulysses, usp or allgather.
        scale: softmax scale (default D ** -0.5).
        head_chunks: ring strategies run the ring once per chunk of heads, so the blocks and gradient
            accumulators in flight are 1/head_chunks of the whole (same bytes on the wire, more messages).
            Default: `default_head_chunks` (8 for large blocks, 1 for small ones; capped at the head count).
        bias: additive biases and masks on global positions (cpdit/attn_bias.py): relative-position table (ALiBi,
            continuous position bias), null keys/values, text and frame padding. Its table and null_kv are
            differentiable; their gradients on each rank are partial (summed over cp like the text's).
        bias_rows: with a bias, query rows per kernel call (0: whole blocks). Bounds the working set of a biased
            call — its (B, H, rows, keys) bias and the probabilities the table gradient recomputes — exactly (rows
            are independent). Default: `default_bias_rows` (a 32 MiB block).
    Returns:
        (B, H, L + T_local * tpf, D) in q's dtype.
    """
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must all be (B, H, S, D) of one shape; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] != plan.local_len():
        raise ValueError(
            f"q has {q.shape[2]} tokens but the plan gives this rank {plan.local_len()} (text_len={plan.text_len} + "
            f"{plan.num_local_frames()} frames x {plan.tokens_per_frame}); shard the sequence with plan.shard"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunks = default_head_chunks(k) if head_chunks is None else head_chunks
    if chunks < 1:
        raise ValueError(f"head_chunks={chunks} must be >= 1")
    chosen = resolve_strategy(strategy, plan, q.shape[1])
    table = null_kv = None
    rows = 0
    if bias is not None:
        _check_bias(bias, plan, q)
        table, null_kv = bias.table, bias.null_kv
        num_null = 0 if null_kv is None else null_kv.shape[2]
        rows = default_bias_rows(plan, q.shape[1], num_null) if bias_rows is None else bias_rows
        if rows < 0:
            raise ValueError(f"bias_rows={rows} must be >= 0 (0: whole blocks)")
    if chosen == "local":
        if not causal and bias is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return BlockwiseAttention.apply(
            q, k, v, table, null_kv, _block_spec(plan, "local", causal, scale, 1, bias, rows)
        )
    if chosen == "ring":
        return BlockwiseAttention.apply(
            q, k, v, table, null_kv, _block_spec(plan, "ring", causal, scale, chunks, bias, rows)
        )
    if chosen == "allgather":
        spec = _block_spec(plan, "ring", causal, scale, 1, bias, rows)
        return AllGatherAttention.apply(q, k, v, table, null_kv, spec)
    uspec = _ulysses_spec(plan, chosen, q.shape[1])
    qkv = SeqToHead.apply(torch.stack([q, k, v]), uspec)  # (3, B, h_me, L + N_group, D): one all-to-all
    if bias is not None:  # this member's heads of the head-indexed tensors (their gradient: this slice's share)
        bias = bias.heads(uspec.head_slice(uspec.rank))
        table, null_kv = bias.table, bias.null_kv
    spec = _block_spec(plan, chosen, causal, scale, chunks, bias, rows)
    out = BlockwiseAttention.apply(qkv[0], qkv[1], qkv[2], table, null_kv, spec)
    return HeadToSeq.apply(out, uspec)
