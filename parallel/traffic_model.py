# Bytes one rank sends in one training step of a CogVideoX-family model under a layout, counted the way
# parallel.all_traffic.count_all_traffic counts what runs (ring algorithms: an all-reduce of n bytes over g ranks sends
# 2 n (g-1)/g, an all-gather or reduce-scatter of a g-way sharded n bytes sends n (g-1)/g). The planner
# (launch/plan.py) prints it; bench/memory.py measures it next to the prediction.
from __future__ import annotations

from dataclasses import dataclass, fields

from parallel.dims import FLAT_DIMS, MESH_DIMS, ParallelDims

FP32 = 4


@dataclass
class Traffic:
    """Bytes sent per rank per optimizer step (one micro-step), by what sends them."""

    fsdp: int = 0
    """FSDP2 over dp_shard x cp: each block's parameters all-gathered for its forward and its backward (in the
    mixed-precision dtype when one is set), gradients reduce-scattered in fp32 (the root's parameters once)."""
    replicate: int = 0
    """HSDP (parallel.dp_replicate > 1): the reduce-scattered gradient shards all-reduced over the replicas."""
    tensor_parallel: int = 0
    """DTensor TP: the row-parallel outputs all-reduced in the forward, column-parallel inputs' gradients in the
    backward (recomputed forwards repeat theirs)."""
    ulysses: int = 0
    """Context-parallel attention's all-to-alls (q, k, v in, out back; the backward's four); a recomputed forward
    sends its part again."""
    ring: int = 0
    """Ring attention's K/V (forward), K/V and dK/dV (backward)."""
    gradients: int = 0
    """The flat gradient all-reduce when parameters are not sharded (parallel.fsdp=false)."""

    @property
    def attention(self) -> int:
        return self.ulysses + self.ring

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


# The mesh group each part of the traffic runs over, and how it sends: "ring" (a ring collective or the ring's P2P:
# each rank sends to its successor) or "all-to-all" (each rank to every other member).
GROUPS = {
    "fsdp": ("dp_shard_cp", "ring"),
    "replicate": ("dp_replicate", "ring"),
    "tensor_parallel": ("tp", "ring"),
    "ulysses": ("cp_ulysses", "all-to-all"),
    "ring": ("cp_ring", "ring"),
    "gradients": ("dp_cp", "ring"),
}


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
    compute_bytes: int = FP32,
) -> Traffic:
    """`params_tp`: elements of this rank's tensor-parallel part of the model; `root_params_tp`: of it, those
    outside the blocks (one FSDP unit gathered once). `compute_bytes`: 2 for bf16/fp16 training (FSDP2 gathers
    parameters in that dtype and autocast's activations are in it; gradients are reduced in fp32), 4 for fp32."""
    t = Traffic()
    shards = dims.size("dp_shard_cp")
    sharded = fsdp and (shards > 1 or dims.dp_replicate > 1)  # FSDP2 applied: its mixed-precision policy too
    if sharded:
        blocks = params_tp - root_params_tp
        gather = (2 * blocks + root_params_tp) * compute_bytes  # forward and backward (the root's once)
        t.fsdp = int((gather + params_tp * FP32) * (shards - 1) / shards)
        r = dims.dp_replicate
        t.replicate = int(2 * params_tp / shards * FP32 * (r - 1) / r)
    elif dims.size("dp_cp") > 1:
        g = dims.size("dp_cp")
        t.gradients = int(2 * params_tp * FP32 * (g - 1) / g)
    d, layers = cfg.hidden_size, cfg.num_layers
    local_tokens = text_len + frames * tokens_per_frame / dims.cp
    act = batch * local_tokens * d  # elements of one (B, S_local, d) activation
    recompute = {"none": 0, "full": 1.0, "selective": 0.5}[activation_checkpointing]  # forwards run again
    if dims.tp > 1:
        # forward: attention out + feed-forward out (a linear's output: autocast's dtype); backward: the gradients
        # of the q/k/v inputs and the feed-forward input, the normalised activations, in the parameters' dtype
        # (bf16 when FSDP2 gathers them so; without FSDP the norms' fp32 weights keep them fp32 under autocast)
        grad_bytes = compute_bytes if sharded else FP32
        per_layer = (2 * (1 + recompute) * compute_bytes + 4 * grad_bytes) * act * 2 * (dims.tp - 1) / dims.tp
        t.tensor_parallel = int(per_layer * layers)
    if dims.cp > 1:
        heads = cfg.num_attention_heads // dims.tp
        video = frames * tokens_per_frame
        U, R = dims.ulysses_size, dims.ring_size
        # one q/k/v/out tensor of this rank before the all-to-all: (B, heads, S_local, Dh), in autocast's dtype
        block = batch * heads * (video / dims.cp) * cfg.attention_head_dim * compute_bytes
        if U > 1:  # q, k, v in and out back; dout in and dq, dk, dv back
            t.ulysses = int((4 * block * (U - 1) / U * (1 + recompute) + 4 * block * (U - 1) / U) * layers)
        if R > 1:  # after Ulysses a block is heads / U of U x the frames: the same bytes
            # K and V round the ring, forward and backward; the dK, dV accumulators in fp32
            grads = 2 * block * FP32 // compute_bytes
            t.ring = int((2 * block * (1 + recompute) + 2 * block + grads) * (R - 1) * layers)
    return t


def group_nodes(dims: ParallelDims, dim: str, per_node: int, rank: int = 0) -> tuple[int, int]:
    """(members, nodes they span) of `rank`'s group on mesh dim or flattened view `dim`, with ranks placed on nodes
    of `per_node` consecutive ranks (torchrun's and SLURM's block placement)."""
    mine = dims.coords(rank)
    names = FLAT_DIMS.get(dim, (dim,))
    others = [n for n in MESH_DIMS if n not in names]
    members = [r for r in range(dims.world_size) if all(dims.coords(r)[n] == mine[n] for n in others)]
    return len(members), len({r // per_node for r in members})


def across_nodes(traffic: Traffic, dims: ParallelDims, per_node: int) -> int:
    """Of the bytes a rank sends per step, those that cross nodes, averaged over the ranks. A ring over g members
    on k nodes (members grouped by node) crosses k of its g links; an all-to-all sends a rank's bytes evenly to its
    g - 1 peers, g - g/k of them on other nodes."""
    out = 0.0
    for name, (dim, kind) in GROUPS.items():
        sent = getattr(traffic, name)
        if not sent:
            continue
        g, k = group_nodes(dims, dim, per_node)
        if k > 1:
            out += sent * (k / g if kind == "ring" else (g - g / k) / (g - 1))
    return int(out)
