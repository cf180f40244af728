# The global gradient norm (for clipping, the fp16 loss scale and the NaN guard) over sharded parameters: plain
# tensors, FSDP2 DTensors (1-D) or FSDP2 x TP (2-D).
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate

from parallel.comm import all_reduce


def _squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of every element, a float64 scalar on the tensors' device: one foreach norm (float64
    accumulation, as torch's clip_grad_norm_), no host copy."""
    return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float64)).pow(2).sum()


@torch.no_grad()
def global_grad_norm(params: list[torch.Tensor]) -> float:
    """L2 norm of the full gradient, identical on every rank: local squared sums per (mesh, sharded dims)
    signature, each reduced once over the dims where the gradient is sharded, added on the device; the one
    device-to-host copy is the returned float (torchtitan's clipping does the same; a copy per parameter would stall
    a GPU once per parameter per step)."""
    plain: list[torch.Tensor] = []
    groups: dict[tuple, tuple] = {}
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
            groups.setdefault(key, (mesh, sharded, []))[2].append(g.to_local())
        else:
            plain.append(g)
    parts = [_squares(plain)] if plain else []
    for key in sorted(groups):
        mesh, sharded, local = groups[key]
        s = _squares(local)
        for d in sharded:
            all_reduce(s, mesh.get_group(d), f"grad norm, mesh dim {d}")
        parts.append(s)
    if not parts:
        return 0.0
    total = torch.stack([s.to(parts[0].device) for s in parts]).sum().item()
    return math.sqrt(total) if math.isfinite(total) else float("nan")


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
