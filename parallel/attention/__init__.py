# Context-parallel attention over the frame-token axis: one entry point, several strategies.
#
# q, k, v on each rank are (B, H, L + T_local * tpf, D): the text prefix (replicated on every cp rank) followed
# by the rank's frames, as `SequencePlan.shard` lays them out. The output has the same shape and equals —
# forward and backward — full softmax attention over the whole unsharded sequence followed by `plan.shard`.
#
# Rule for the replicated text tokens: their query outputs are identical (bitwise) on every cp rank. Their
# gradients follow the partial convention of parallel/sequence.py: each rank's dq/dk/dv of the text rows is its
# share, and the sum over the cp ranks (done by the parameter-gradient reduction over dp x cp) is the true one.
#
# Strategies: ring (parallel/attention/ring.py), ulysses (ulysses.py + a local ring of one), usp (Ulysses inside
# cp_ulysses, ring across cp_ring), allgather (allgather.py), auto (by the mesh shape and the head count); dispatch.py
# chooses one and builds its spec. The block engine (ring.py BlockwiseAttention) runs the ring, the local path and
# the ring of one after an all-to-all; blocks.py holds the per-block kernels' bookkeeping.
from parallel.attention.dispatch import (
    BIAS_BLOCK_BYTES,
    CHUNK_ABOVE_BYTES,
    DEFAULT_RING_HEAD_CHUNKS,
    STRATEGIES,
    context_parallel_attention,
    default_bias_rows,
    default_head_chunks,
    head_chunks_for,
    resolve_strategy,
)

__all__ = [
    "STRATEGIES",
    "DEFAULT_RING_HEAD_CHUNKS",
    "CHUNK_ABOVE_BYTES",
    "BIAS_BLOCK_BYTES",
    "head_chunks_for",
    "default_head_chunks",
    "default_bias_rows",
    "resolve_strategy",
    "context_parallel_attention",
]
