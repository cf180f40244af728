# Data-parallel gradient handling: FSDP2 (fully_shard) over dp_shard x cp, or a plain all-reduce when parameters
# are not sharded. cp ranks hold identical parameters and partial gradients (their own frames), so gradients are
# SUMMED over cp and AVERAGED over data-parallel ranks: each rank's loss is its share of its replica's mean loss.
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from parallel.comm import all_reduce


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_output_grad(model: nn.Module, factor: float) -> None:
    """Multiply the gradient entering the model's output by `factor` (identity forward). Every parameter gradient
    flows from the output, so this scales all of them exactly."""
    model.register_forward_hook(lambda module, args, out: _ScaleGrad.apply(out, factor))


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    cp: int,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard each block, then the root, over `mesh` (dp_shard x cp; or (dp_replicate, dp_shard x cp): HSDP).

    FSDP averages over the dp x cp ranks of the mesh; cp gradients must be summed, so the output gradient is
    scaled by cp first (set_gradient_divide_factor would need ReduceOp.PREMUL_SUM, which gloo lacks).
    Mixed precision: see `precision_policy`."""
    mp = precision_policy(param_dtype, reduce_dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if cp > 1:
        scale_output_grad(model, float(cp))


def precision_policy(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP2's mixed precision as torchtitan runs it: the sharded parameters, their gradients and the optimizer
    state stay in their own dtype (fp32 master weights); each unit all-gathers its parameters cast to `param_dtype`
    (bf16: half the bytes and half the unsharded memory) and reduce-scatters gradients in `reduce_dtype` (fp32).
    Forward inputs are not cast: the models cast what they take to their weights' dtype themselves, after computing
    the timestep embedding from fp32 timesteps (999 is 1000 in bf16) and keeping RoPE's tables fp32."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)


def shard_module(
    module: nn.Module,
    mesh: DeviceMesh,
    reduce_dtype: torch.dtype | None = torch.float32,
    param_dtype: torch.dtype | None = None,
) -> None:
    """fully_shard an auxiliary trainable module (e.g. a text encoder) as one unit over `mesh`."""
    fully_shard(module, mesh=mesh, mp_policy=precision_policy(param_dtype, reduce_dtype))


class GradientAllReduce:
    """Without FSDP: after the backward of the last micro-step, every gradient is summed over dp x cp and divided
    by dp, in one flat all-reduce per dtype, in parameter order (identical on every rank; reducing from autograd
    hooks instead would follow each rank's own backward order, and with accumulation would reduce partial sums
    more than once). DTensor (tensor-parallel) gradients reduce their local shards. Parameters are looked up at
    each call: a model built on the meta device gets new parameter objects when it is materialised."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup, dp: int):
        self.module = module
        self.group, self.dp = group, dp

    @torch.no_grad()
    def __call__(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        for dtype in sorted({g.dtype for g in local}, key=str):
            bucket = [g for g in local if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in bucket])  # (sum of numels,)
            all_reduce(flat, self.group, "gradients")
            flat.div_(self.dp)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def apply_grad_allreduce(model: nn.Module, group: dist.ProcessGroup, dp: int) -> None:
    """Without FSDP: gradients are reduced by `reduce_gradients(model)` once per optimizer step."""
    model._cpdit_grad_allreduce = GradientAllReduce(model, group, dp)


def reduce_gradients(module: nn.Module) -> None:
    """Call once after the last backward of an optimizer step: reduces the gradients of every submodule under
    `apply_grad_allreduce` (FSDP2 modules reduce-scatter in their backward and need nothing)."""
    for m in module.modules():
        reducer = m.__dict__.get("_cpdit_grad_allreduce")
        if reducer is not None:
            reducer()


def adamw_foreach(params, requested: bool | None = None) -> bool | None:
    """AdamW's `foreach` for `params`: torch's default (None: the multi-tensor step on CUDA) unless the parameters mix
    DTensors and plain tensors, as a tensor-parallel model without data parallelism has them (its blocks' DTensors,
    the rest plain): the multi-tensor step refuses the mix ("got mixed torch.Tensor and DTensor"), so it takes the
    per-tensor step. `requested`: the caller's choice, kept where it can work."""
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in params}
    return False if len(kinds) > 1 else requested
