# Per-rank memory of one training step of a layout, predicted without the ranks: the rank's image of the model is
# built on the meta device (tensor-parallel shards by the family's plan, this rank's frames, the activation
# checkpointing policy) and one forward + backward runs under cpdit/live_memory.py; what the simulation does not
# see is added from the layout: FSDP2's sharded parameters, gradients and optimizer state, its unsharded block
# parameters and gradients in flight, and the attention's communication buffers. `cpdit-launch plan` prints it;
# bench/memory.py and tests/test_plan.py measure the same step for real and compare.
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from cpdit.live_memory import LiveMemory
from cpdit.models.registry import family_of
from cpdit.partition import even_split, frame_partition
from parallel.dims import ParallelDims
from parallel.parallelize import apply_activation_checkpointing
from parallel.tensor_parallel import heads_error, plan_matches

FP32 = 4


@dataclass(frozen=True)
class Workload:
    """One micro-batch of a data-parallel rank, in the model's input space."""

    frames: int
    """Latent frames (13 for CogVideoX's 49 pixel frames)."""
    height: int
    """Latent height (60 for 480 pixels)."""
    width: int
    """Latent width (90 for 720 pixels)."""
    text_len: int = 226
    """Text tokens."""
    batch: int = 1
    """Samples per micro-step and data-parallel rank."""
    frames_per_patch: int = 1
    """Latent frames per patch-frame (CogVideoX 1.5: 2; `frames` then counts the padded latent frames)."""

    @property
    def token_frames(self) -> int:
        """Frames of tokens: what context parallelism partitions."""
        return self.frames // self.frames_per_patch


@dataclass
class MemoryEstimate:
    """Bytes per rank at the step's peak, by what holds them (the peak is the largest of the forward + backward
    peak and the optimizer step's)."""

    params: int = 0
    """Parameters this rank keeps (its FSDP2 shard of its tensor-parallel part)."""
    grads: int = 0
    """Gradients alive at the peak (under FSDP2 the shards of the units already reduced, and whole ones in flight)."""
    optimizer: int = 0
    """AdamW's two moments (and the EMA copy when kept)."""
    activations: int = 0
    """What the forward keeps for the backward plus the backward's temporaries at the peak."""
    fsdp_buffers: int = 0
    """FSDP2's unsharded block parameters and gradients in flight at the peak."""
    comm_buffers: int = 0
    """Attention's receive buffers (ring K/V in flight; Ulysses' all-to-all outputs are counted as activations)."""
    step_buffers: int = 0
    """The optimizer step's temporaries, when the step is the peak."""
    frozen: int = 0
    """Weights of the frozen modules in memory (the VAE, a frozen T5): launch/plan.py's frozen_bytes."""

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


class _TraceBound:
    """One cp rank's image of the sequence seam on the meta device: this rank's frames (the largest share), text
    replicated, attention as the flash kernel keeps it (q, k, v, out, logsumexp: what the ring and Ulysses keep too)."""

    def __init__(self, num_frames: int, cp: int):
        self.num_frames, self.cp = num_frames, cp
        self.local = max(b - a for segs in frame_partition(num_frames, cp) for a, b in segs)

    def frame_ids(self, device):
        return torch.arange(self.local, device=device)

    def shard_frames(self, x, dim: int = 1):
        return x.narrow(dim, 0, self.local) if self.cp > 1 else x

    def gather_frames(self, x, dim: int = 1):
        shape = list(x.shape)
        shape[dim] = self.num_frames
        return x.new_empty(shape) if self.cp > 1 else x

    def attention(self, q, k, v, *, causal=None, bias=None, scale=None):
        if bias is not None or causal:
            raise NotImplementedError("the planner models unbiased, non-causal attention (the CogVideoX family)")
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[0]


class _TraceSequence:
    def __init__(self, cp: int):
        self.cp = cp

    def bind(self, num_frames: int, tokens_per_frame: int, text_len: int) -> _TraceBound:
        del tokens_per_frame, text_len  # the seam's signature; the trace only splits frames
        return _TraceBound(num_frames, self.cp)

    def frames(self, num_frames: int) -> _TraceBound:
        return self.bind(num_frames, 1, 0)


def _shard_tp(model: nn.Module, tp: int) -> None:
    """Give every module of the family's tensor-parallel plan its local shape (meta: shapes only)."""
    if tp == 1:
        return
    for _, module, style in plan_matches(model, dict(family_of(model).tp_plan)):
        if style not in ("colwise", "rowwise") or not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if style == "colwise":
            module.out_features //= tp
            module.weight = nn.Parameter(w.new_empty(w.shape[0] // tp, w.shape[1]))
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.new_empty(w.shape[0] // tp))
        else:
            module.in_features //= tp
            module.weight = nn.Parameter(w.new_empty(w.shape[0], w.shape[1] // tp))


def _fsdp_shard(p: torch.Tensor, shards: int) -> int:
    """Elements one rank holds of a parameter FSDP2 shards over `shards` ranks (dim 0 padded to a multiple)."""
    return -(-p.shape[0] // shards) * (p.numel() // p.shape[0]) if shards > 1 and p.dim() else p.numel()


class _FSDPImage:
    """FSDP2's memory on one rank played into a LiveMemory from module and gradient hooks. Units: each block, and the
    root (the parameters outside the blocks, gathered from its forward to the end of its backward). An all-gather
    lands in a flat buffer that is copied out into the unsharded parameters and freed. A block is gathered before
    its forward (freed after it), and before its backward, when the block the backward reaches next is prefetched
    too (FSDP2's default). Once all of a unit's gradients exist they are copied into a flat buffer and
    reduce-scattered; the full gradients and the unit's parameters are freed and the shard stays. Without FSDP
    (`shards` 1) gradients stay whole."""

    def __init__(self, model: nn.Module, mem: LiveMemory, shards: int):
        self.mem, self.shards, self.backward = mem, shards, False
        self.sharded_grads = 0
        self.buffers = 0  # FSDP's unsharded parameters and flat buffers, live now
        self.units: dict[nn.Module, list[nn.Parameter]] = {b: list(b.parameters()) for b in model.blocks}
        in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
        self.units[model] = [p for p in model.parameters() if id(p) not in in_blocks]
        self.pending = {u: len(ps) for u, ps in self.units.items()}
        self.gathered: set[nn.Module] = set()
        blocks = list(model.blocks)
        for unit, params in self.units.items():
            unit.register_forward_pre_hook(lambda *_, u=unit: self._gather(u))
            if unit is not model:  # FSDP2 keeps the root's parameters gathered until its backward ends
                unit.register_forward_hook(lambda *_, u=unit: None if self.backward else self._free(u))
                i = blocks.index(unit)
                prefetch = blocks[i - 1] if i else None
                unit.register_full_backward_pre_hook(lambda *_, u=unit, n=prefetch: self._backward_gather(u, n))
            for p in params:
                p.register_post_accumulate_grad_hook(lambda p, u=unit: self._grad_done(u))

    def _full(self, unit: nn.Module) -> int:
        return sum(p.numel() for p in self.units[unit]) * FP32

    def _gather(self, unit: nn.Module) -> None:
        if self.shards > 1 and unit not in self.gathered:
            self.gathered.add(unit)
            self._bump(2 * self._full(unit))  # the all-gather's flat output and the unsharded parameters
            self._bump(-self._full(unit))  # the flat output, after the copy-out

    def _backward_gather(self, unit: nn.Module, prefetch: nn.Module | None) -> None:
        self._gather(unit)
        if prefetch is not None:
            self._gather(prefetch)

    def _free(self, unit: nn.Module) -> None:
        if unit in self.gathered:
            self.gathered.discard(unit)
            self._bump(-self._full(unit))

    def _bump(self, nbytes: int) -> None:
        self.buffers += nbytes
        self.mem.bump(nbytes)

    def snapshot(self) -> dict[str, int]:
        """What holds memory now besides activations: gradients (whole ones alive, shards kept) and FSDP buffers."""
        whole = sum(
            p.grad.numel() * p.grad.element_size() for ps in self.units.values() for p in ps if p.grad is not None
        )
        return {"grads": whole + self.sharded_grads, "fsdp": self.buffers}

    def _grad_done(self, unit: nn.Module) -> None:
        self.pending[unit] -= 1
        if self.pending[unit] or self.shards == 1:
            return
        full = self._full(unit)
        shard = sum(_fsdp_shard(p, self.shards) for p in self.units[unit]) * FP32
        self._bump(full)  # the flat reduce-scatter input...
        self.sharded_grads += shard
        self.mem.bump(shard)  # ...and the shard it returns
        self._bump(-full)
        for p in self.units[unit]:
            p.grad = None
        self.mem.collect()
        self._free(unit)


def _ring_buffers(cfg, work: Workload, dims: ParallelDims) -> int:
    """The ring's blocks in flight on one rank: the K and V being received (forward) and the K, V, dK, dV being
    passed on (backward) for one chunk of heads (parallel/attention: 8 passes for large blocks, else 1)."""
    if dims.ring_size == 1:
        return 0
    from parallel.attention import head_chunks_for

    heads = cfg.num_attention_heads // dims.tp // dims.ulysses_size
    tokens = work.text_len + _local_frames(work, dims) * dims.ulysses_size * _tokens_per_frame(cfg, work)
    kv = 2 * work.batch * heads * tokens * cfg.attention_head_dim * FP32
    chunks = min(head_chunks_for(kv), heads)
    return 2 * kv // chunks


def _tokens_per_frame(cfg, work: Workload) -> int:
    return (work.height // cfg.patch_size) * (work.width // cfg.patch_size)


def _local_frames(work: Workload, dims: ParallelDims) -> int:
    return max(even_split(work.token_frames, dims.cp)) if dims.cp > 1 else work.token_frames


def local_params(cfg, dims: ParallelDims, fsdp: bool = True) -> tuple[int, int]:
    """(elements this rank keeps, elements of its tensor-parallel part before FSDP sharding)."""
    with torch.device("meta"):
        model = family_of(cfg).model_class(cfg)
    _shard_tp(model, dims.tp)
    shards = dims.size("dp_shard_cp") if fsdp else 1
    tp_part = sum(p.numel() for p in model.parameters())
    return sum(_fsdp_shard(p, shards) for p in model.parameters()), tp_part


def _simulate(cfg, work: Workload, dims: ParallelDims, activation_checkpointing: str, shards: int) -> dict:
    """One forward + backward of this rank's image of the model on the meta device: the peak (bytes) and what held
    it besides activations (gradients, FSDP buffers)."""
    with torch.device("meta"):
        model = family_of(cfg).model_class(cfg)
    _shard_tp(model, dims.tp)
    model.sequence = _TraceSequence(dims.cp)
    apply_activation_checkpointing(model, activation_checkpointing)
    b, dev = work.batch, torch.device("meta")
    latents = torch.empty(b, work.frames, cfg.in_channels, work.height, work.width, device=dev)
    text = torch.empty(b, work.text_len, cfg.text_embed_dim, device=dev)
    timesteps = torch.empty(b, device=dev)
    mem = LiveMemory()
    image = _FSDPImage(model, mem, shards)
    mem.snapshot = image.snapshot
    with mem:
        loss = model(latents, text, timesteps, return_local=True).square().mean()
        image.backward = True
        loss.backward()
    return {"peak": mem.peak, "grads": mem.at_peak.get("grads", 0), "fsdp": mem.at_peak.get("fsdp", 0)}


def estimate_memory(
    cfg,
    work: Workload,
    dims: ParallelDims,
    activation_checkpointing: str = "none",
    *,
    fsdp: bool = True,
    ema: bool = False,
    foreach: bool = True,
) -> MemoryEstimate:
    """Per-rank bytes of one fp32 training step (forward, backward, AdamW step) of a family model under `dims`.

    The forward and backward run on the meta device as this rank runs them (its tensor-parallel shard, its frames,
    `activation_checkpointing` applied from outside as the job applies it); FSDP2 over dp_shard x cp is played in
    from hooks. The blocks are identical, so every quantity at the forward + backward peak is linear in the number of
    blocks (with `none` or `full` checkpointing the peak is at the same point of the step whatever the depth): a
    deep model is simulated with 2 and 3 blocks and extrapolated (tests/test_plan.py checks it against the whole
    simulation). `foreach`: AdamW's multi-tensor step (the CUDA default) holds about one parameter-sized
    temporary; the per-tensor step (CPU) two of the largest parameter."""
    if err := heads_error(cfg.num_attention_heads, dims.tp):
        raise ValueError(err)
    shards = dims.size("dp_shard_cp") if fsdp else 1
    with torch.device("meta"):
        model = family_of(cfg).model_class(cfg)
    _shard_tp(model, dims.tp)
    sizes = [_fsdp_shard(p, shards) * FP32 for p in model.parameters()]
    kept = sum(sizes)  # parameters kept = gradients after the step's reductions
    est = MemoryEstimate(params=kept, optimizer=(2 + int(ema)) * kept, comm_buffers=_ring_buffers(cfg, work, dims))

    layers = cfg.num_layers
    if layers > 3 and activation_checkpointing in ("none", "full"):
        two, three = (
            _simulate(replace(cfg, num_layers=n), work, dims, activation_checkpointing, shards) for n in (2, 3)
        )
        sim = {k: two[k] + (layers - 2) * (three[k] - two[k]) for k in two}
    else:
        sim = _simulate(cfg, work, dims, activation_checkpointing, shards)
    est.grads, est.fsdp_buffers = sim["grads"], sim["fsdp"]
    est.activations = sim["peak"] - sim["grads"] - sim["fsdp"]
    # AdamW's step: every gradient, and its temporaries; when it is the larger peak, no activations are alive. A
    # tensor-parallel model without FSDP mixes DTensors and plain tensors: per-tensor (parallel.fsdp.adamw_foreach)
    fsdp_applied = fsdp and (dims.size("dp_shard_cp") > 1 or dims.dp_replicate > 1)
    foreach = foreach and (dims.tp == 1 or fsdp_applied)
    step = kept + (kept if foreach else 2 * max(sizes))
    if not fsdp and dims.size("dp_cp") > 1:
        step = max(step, 2 * kept)  # the flat gradient all-reduce buffer (parallel/fsdp.py)
    if step > sim["peak"]:
        est.grads, est.fsdp_buffers, est.activations, est.comm_buffers, est.step_buffers = kept, 0, 0, 0, step - kept
    return est
