# Bytes one rank sends in one training step of a CogVideoX-family model under a layout, counted the way
# parallel.all_traffic.count_all_traffic counts what runs (ring algorithms: an all-reduce of n bytes over g ranks sends
# 2 n (g-1)/g, an all-gather or reduce-scatter of a g-way sharded n bytes sends n (g-1)/g). The planner
# (launch/plan.py) prints it; bench/memory.py measures it next to the prediction.
from __future__ import annotations

from dataclasses import dataclass, fields

from parallel.dims import ParallelDims

FP32 = 4


@dataclass
class Traffic:
    """Bytes sent per rank per optimizer step (one micro-step), by what sends them."""

    fsdp: int = 0
    """FSDP2: each block's parameters all-gathered for its forward and its backward, gradients reduce-scattered
    (the root's parameters once)."""
    tensor_parallel: int = 0
    """DTensor TP: the row-parallel outputs all-reduced in the forward, column-parallel inputs' gradients in the
    backward (recomputed forwards repeat theirs)."""
    attention: int = 0
    """Context-parallel attention: the ring's K/V (forward), K/V and dK/dV (backward); Ulysses' all-to-alls; a
    recomputed forward sends its part again."""
    gradients: int = 0
    """The flat gradient all-reduce when parameters are not sharded (parallel.fsdp=false)."""

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def estimate_traffic(
    cfg,
    frames: int,
    tokens_per_frame: int,
    text_len: int,
    batch: int,
    dims: ParallelDims,
    params_tp: int,
    root_params_tp: int,
    activation_checkpointing: str = "none",
    fsdp: bool = True,
) -> Traffic:
    """`params_tp`: elements of this rank's tensor-parallel part of the model; `root_params_tp`: of it, those
    outside the blocks (one FSDP unit gathered once)."""
    t = Traffic()
    shards = dims.size("dp_shard_cp")
    if fsdp and shards > 1:
        blocks = params_tp - root_params_tp
        t.fsdp = int((3 * blocks + 2 * root_params_tp) * FP32 * (shards - 1) / shards)
    elif dims.size("dp_cp") > 1:
        g = dims.size("dp_cp")
        t.gradients = int(2 * params_tp * FP32 * (g - 1) / g)
    d, layers = cfg.hidden_size, cfg.num_layers
    local_tokens = text_len + frames * tokens_per_frame / dims.cp
    act = batch * local_tokens * d * FP32  # one (B, S_local, d) activation
    recompute = {"none": 0, "full": 1.0, "selective": 0.5}[activation_checkpointing]  # forwards run again
    if dims.tp > 1:
        # forward: attention out + feed-forward out; backward: the q/k/v inputs and the feed-forward input
        per_layer = (2 * (1 + recompute) + 4) * act * 2 * (dims.tp - 1) / dims.tp
        t.tensor_parallel = int(per_layer * layers)
    if dims.cp > 1:
        heads = cfg.num_attention_heads // dims.tp
        video = frames * tokens_per_frame
        U, R = dims.ulysses_size, dims.ring_size
        # one q/k/v/out tensor of this rank before the all-to-all: (B, heads, S_local, Dh)
        block = batch * heads * (video / dims.cp) * cfg.attention_head_dim * FP32
        forward = backward = 0.0
        if U > 1:  # q, k, v in and out back; dout in and dq, dk, dv back
            forward += 4 * block * (U - 1) / U
            backward += 4 * block * (U - 1) / U
        if R > 1:  # after Ulysses a block is heads / U of U x the frames: the same bytes
            forward += 2 * block * (R - 1)  # K and V round the ring
            backward += 4 * block * (R - 1)  # K, V and the dK, dV accumulators
        t.attention = int((forward * (1 + recompute) + backward) * layers)
    return t
