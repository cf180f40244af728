# Full (unsharded) tensors in and out of a parallelized model: initial values, pretrained weights, exports.
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Store the full tensor `full` into `param`, keeping only this rank's shard of a DTensor parameter. Every rank
    holds the same `full` (deterministic init or the same file), so no communication is needed."""
    if isinstance(param, DTensor):
        shard = distribute_tensor(
            full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full.to(param.device, param.dtype))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        if name in state:
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != model {tuple(p.shape)}")
            assign_full(p, state[name])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or gradient; a collective for DTensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t
