# Tensor parallelism of the CogVideoX blocks with DTensor: q/k/v column-parallel (heads split over tp), attention
# output row-parallel, feed-forward column -> row. The per-head q/k LayerNorm weights are shared by all heads, so
# each tp rank sees only its heads' share of their gradient: a copy-to-tp-region (identity forward, all-reduce
# backward; fairscale's mappings.py) makes it whole.
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity forward; backward sums the gradient over the tensor-parallel group."""
    if dist.get_world_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


class TPSharedLayerNorm(nn.LayerNorm):
    """LayerNorm applied to tp-local heads whose affine parameters are shared across all heads."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tp(self.weight, self.tp_group) if self.weight is not None else None
        b = copy_to_tp(self.bias, self.tp_group) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _share_norm(norm: nn.LayerNorm, group: dist.ProcessGroup) -> None:
    norm.__class__ = TPSharedLayerNorm  # same parameters and state-dict keys, tp-aware forward
    norm.tp_group = group


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard every block of a CPDiT over `tp_mesh` (in place)."""
    tp = tp_mesh.size()
    heads = model.config.num_attention_heads
    if heads % tp:
        raise ValueError(
            f"model_parallel_size={tp} does not divide num_attention_heads={heads}; choose a divisor of {heads}"
        )
    if model.config.ff_hidden % tp:
        raise ValueError(f"model_parallel_size={tp} does not divide the feed-forward width {model.config.ff_hidden}")
    group = tp_mesh.get_group()
    plan = {
        "attn.to_q": ColwiseParallel(),
        "attn.to_k": ColwiseParallel(),
        "attn.to_v": ColwiseParallel(),
        "attn.to_out": RowwiseParallel(),
        "ff.proj_in": ColwiseParallel(),
        "ff.proj_out": RowwiseParallel(),
    }
    lora_plan = {  # adapters follow their layer: column-parallel up-projection, row-parallel down-projection
        "attn.lora.to_q.lora_B": ColwiseParallel(),
        "attn.lora.to_k.lora_B": ColwiseParallel(),
        "attn.lora.to_v.lora_B": ColwiseParallel(),
        "attn.lora.to_out.lora_A": RowwiseParallel(),
    }
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {**plan, **(lora_plan if hasattr(block.attn, "lora") else {})})
        _share_norm(block.attn.norm_q, group)
        _share_norm(block.attn.norm_k, group)


def apply_factorized_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard the spatial and temporal blocks of a FactorizedDiT over `tp_mesh`: q/k/v and the feed-forward value
    and gate by columns (heads), the attention output and feed-forward output by rows; everything else (norms,
    projections in and out, the time embedding, the blender) is replicated and sees replicated activations."""
    tp = tp_mesh.size()
    c = model.config
    if c.num_attention_heads % tp:
        raise ValueError(
            f"model_parallel_size={tp} does not divide num_attention_heads={c.num_attention_heads}; choose a divisor"
        )
    plan = {}
    for attn in ("attn1", "attn2"):
        plan.update({f"{attn}.to_q": ColwiseParallel(), f"{attn}.to_k": ColwiseParallel()})
        plan.update({f"{attn}.to_v": ColwiseParallel(), f"{attn}.to_out": RowwiseParallel()})
    for ff in ("ff", "ff_in"):
        plan.update({f"{ff}.proj": ColwiseParallel(), f"{ff}.gate": ColwiseParallel(), f"{ff}.out": RowwiseParallel()})
    for stage in model.blocks:
        for block in [*stage.transformer_blocks, *(b for stack in stage.time_stack for b in stack)]:
            present = {k: v for k, v in plan.items() if isinstance(getattr(block, k.split(".")[0], None), nn.Module)}
            parallelize_module(block, tp_mesh, present)


class TPHeads:
    """The tensor-parallel answer to cpdit/phenaki.py's `heads` seam: this rank's slice of per-head tensors, and
    shared parameters whose gradient is summed over tp (each rank's covers only its heads)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)

    def local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // self.size
        return copy_to_tp(t, self.group).narrow(dim, self.rank * n, n)

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(t, self.group)


def apply_phenaki_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a PhenakiDiT over `tp_mesh`: q/k/v and the feed-forward value and gate by columns (heads), outputs by
    rows. Head-indexed tensors (the ALiBi + position-bias table, null keys/values) are sliced to this rank's heads
    and the q/k scales shared by all heads are summed over tp in the backward (`TPHeads`). The PEG, norms and the
    bias MLP are replicated and see replicated activations."""
    tp = tp_mesh.size()
    c = model.config
    if c.num_attention_heads % tp:
        raise ValueError(
            f"model_parallel_size={tp} does not divide num_attention_heads={c.num_attention_heads}; choose a divisor"
        )
    inner = model.blocks[0].ff.proj.out_features
    if inner % tp:
        raise ValueError(f"model_parallel_size={tp} does not divide the feed-forward width {inner}")
    heads = TPHeads(tp_mesh.get_group())
    plan = {"ff.proj": ColwiseParallel(), "ff.gate": ColwiseParallel(), "ff.out": RowwiseParallel()}
    for attn in ("attn", "cross"):
        plan.update({f"{attn}.to_q": ColwiseParallel(), f"{attn}.to_k": ColwiseParallel()})
        plan.update({f"{attn}.to_v": ColwiseParallel(), f"{attn}.to_out": RowwiseParallel()})
    for block in model.blocks:
        present = {k: v for k, v in plan.items() if isinstance(getattr(block, k.split(".")[0], None), nn.Module)}
        parallelize_module(block, tp_mesh, present)
        for attn in (block.attn, block.cross):
            if attn is not None:
                attn.heads = heads
    model.heads = heads
