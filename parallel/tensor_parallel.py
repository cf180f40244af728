# Tensor parallelism from a family's declarative plan (cpdit/models/family.py: module name patterns -> styles) with
# DTensor: q/k/v column-parallel (heads split over tp), attention outputs row-parallel, feed-forwards column -> row.
# Parameters that every head uses (CogVideoX's per-head-dim q/k LayerNorms, Phenaki's q/k scales) see only this
# rank's heads' share of their gradient: a copy-to-tp-region (identity forward, all-reduce backward; fairscale's
# mappings.py) makes it whole.
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from parallel.comm import copy_to_group


class TPSharedLayerNorm(nn.LayerNorm):
    """LayerNorm applied to tp-local heads whose affine parameters are shared across all heads."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_group(self.weight, self.tp_group) if self.weight is not None else None
        b = copy_to_group(self.bias, self.tp_group) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _share_norm(norm: nn.LayerNorm, group: dist.ProcessGroup) -> None:
    norm.__class__ = TPSharedLayerNorm  # same parameters and state-dict keys, tp-aware forward
    norm.tp_group = group


def plan_matches(model: nn.Module, plan: dict[str, str]) -> list[tuple[str, nn.Module, str]]:
    """(name, module, style) for every module of `model` whose name matches a pattern of `plan` (`*` is one dotted
    component; "" is the model itself), in module order."""
    rules = [
        (re.compile(r"\.".join("[^.]+" if c == "*" else re.escape(c) for c in k.split("."))), v)
        for k, v in plan.items()
    ]
    out = []
    for name, module in model.named_modules():
        style = next((v for r, v in rules if r.fullmatch(name)), None)
        if style is not None:
            out.append((name, module, style))
    return out


def heads_error(heads: int, tp: int) -> str | None:
    """The head rule of tensor parallelism, for every family: each of `tp` ranks takes heads / tp whole heads. None
    when it holds, else the error naming the knobs and the fix."""
    if heads % tp:
        return (
            f"model_parallel_size={tp} does not divide model.num_attention_heads={heads}; choose a divisor of {heads}"
        )
    return None


def check_tensor_parallel(model: nn.Module, plan: dict[str, str], tp: int) -> None:
    """Raise ValueError naming the knob when `tp` ranks cannot split `model` by `plan` (model may be on meta)."""
    if err := heads_error(model.config.num_attention_heads, tp):
        raise ValueError(err)
    for name, module, style in plan_matches(model, plan):
        width = {"colwise": "out_features", "rowwise": "in_features"}.get(style)
        if width and getattr(module, width) % tp:
            raise ValueError(
                f"model_parallel_size={tp} does not divide the width {getattr(module, width)} of {name} "
                f"({style}-parallel); choose a divisor of it"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str]) -> None:
    """Shard `model` over `tp_mesh` by its family's plan (in place)."""
    check_tensor_parallel(model, plan, tp_mesh.size())
    group = tp_mesh.get_group()
    heads = TPHeads(group) if "heads" in plan.values() else None
    for _, module, style in plan_matches(model, plan):
        if style == "colwise":
            parallelize_module(module, tp_mesh, ColwiseParallel())
        elif style == "rowwise":
            parallelize_module(module, tp_mesh, RowwiseParallel())
        elif style == "shared_norm":
            _share_norm(module, group)
        elif style == "heads":
            module.heads = heads
        else:
            raise ValueError(f"unknown tensor-parallel style {style!r} in the plan")


class TPHeads:
    """The tensor-parallel answer to the `heads` seam of cpdit/models/phenaki/layers.py: this rank's slice of per-head
    tensors, and shared parameters whose gradient is summed over tp (each rank's covers only its heads)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)

    def local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // self.size
        return copy_to_group(t, self.group).narrow(dim, self.rank * n, n)

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        return copy_to_group(t, self.group)
