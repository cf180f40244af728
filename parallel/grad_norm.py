# The global gradient norm (for clipping, the fp16 loss scale and the NaN guard) over sharded parameters: plain
# tensors, FSDP2 DTensors (1-D) or FSDP2 x TP (2-D).
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate

from parallel.comm import all_reduce


@torch.no_grad()
def global_grad_norm(params: list[torch.Tensor]) -> float:
    """L2 norm of the full gradient, identical on every rank: local squared sums are added per (mesh, sharded
    dims) signature, then reduced once per signature over the dims where the gradient is sharded."""
    plain = torch.zeros((), dtype=torch.float64)
    groups: dict[tuple, list] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):  # squares of partial sums do not add up: sum first
                g = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])
            # every placement but Replicate splits the elements over its mesh dim: Shard and also _StridedShard
            # (FSDP2's dim-0 shard of a tensor TP already sharded on dim 0), which is not a Shard (`is_shard()`
            # is False for it in torch 2.13)
            sharded = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            mesh = g.device_mesh  # keyed by its ranks: the same order on every rank and in every run
            key = (sharded, tuple(mesh.mesh_dim_names or ()), tuple(mesh.mesh.flatten().tolist()))
            entry = groups.setdefault(key, [mesh, sharded, 0.0])
            entry[2] = entry[2] + g.to_local().double().pow(2).sum().cpu()
        else:
            plain += g.double().pow(2).sum().cpu()
    total = plain
    for key in sorted(groups):
        mesh, sharded, s = groups[key]
        s = torch.as_tensor(s, dtype=torch.float64).to(mesh.device_type)
        for d in sharded:
            all_reduce(s, mesh.get_group(d), f"grad norm, mesh dim {d}")
        total = total + s.cpu()
    return math.sqrt(total.item()) if torch.isfinite(total) else float("nan")


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, inv_scale: float = 1.0) -> float:
    """Scale gradients so that their global norm is at most `max_norm` (0 disables); returns the norm before.
    With fp16 loss scaling the gradients hold loss_scale x the true ones: pass inv_scale = 1 / loss_scale and they
    are unscaled in the same multiply (nothing is touched when the norm is not finite: the step is skipped)."""
    norm = global_grad_norm(params) * inv_scale
    if not math.isfinite(norm):
        return norm
    coef = inv_scale
    if max_norm > 0 and norm > max_norm:
        coef *= max_norm / (norm + 1e-6)
    if coef != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
