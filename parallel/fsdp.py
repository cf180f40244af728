# Data-parallel gradient handling: FSDP2 (fully_shard) over dp_shard x cp, or a plain all-reduce when parameters
# are not sharded. cp ranks hold identical parameters and partial gradients (their own frames), so gradients are
# SUMMED over cp and AVERAGED over data-parallel ranks: each rank's loss is its share of its replica's mean loss.
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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
    """fully_shard each block, then the root, over `mesh` (dp_shard x cp).

    FSDP averages over the dp x cp ranks of the mesh; cp gradients must be summed, so the output gradient is
    scaled by cp first (set_gradient_divide_factor would need ReduceOp.PREMUL_SUM, which gloo lacks)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if cp > 1:
        scale_output_grad(model, float(cp))


def shard_module(module: nn.Module, mesh: DeviceMesh, reduce_dtype: torch.dtype | None = torch.float32) -> None:
    """fully_shard an auxiliary trainable module (e.g. a text encoder) as one unit over `mesh`."""
    fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))


def apply_grad_allreduce(model: nn.Module, group: dist.ProcessGroup, dp: int) -> None:
    """Without FSDP: sum each gradient over dp x cp once it is accumulated, then divide by dp."""

    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(dp)

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)
