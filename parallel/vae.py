# Context parallelism for the causal 3D VAE: the frames of a video are split over the ranks of a cp group (whole
# latent frames per rank, uneven allowed; rank 0 also holds the first frame that CogVideoX keeps apart, so 49 pixel
# frames on 4 ranks are 13 + 12 + 12 + 12 <-> 13 latents as 4 + 3 + 3 + 3). `CPTime` is the time-axis seam of
# cpdit/vae/time.py for such a shard:
# - causal padding: the last k-1 frames of the predecessor(s) arrive by P2P (several hops when a predecessor holds
#   fewer than k-1 frames); in the backward their gradient is sent back and added to the predecessor's;
# - GroupNorm: the statistics over the whole time axis come from all-reduces of sums (mean first, then the sum of
#   squared deviations: no all-gather of activations, and no E[x^2] - E[x]^2 cancellation);
# - temporal down/up-sampling: only rank 0 treats its first frame apart; the frame counts of every rank at every
#   level are known to all ranks, so the number of halo hops is agreed on without communication.
# (CogVideoX SAT's cp_enc_dec.py is inference-only: its halo discards the gradient and GroupNorm gathers T.)
from __future__ import annotations

import torch
import torch.distributed as dist

from cpdit.vae.time import double_counts, halve_counts, latent_partition, pixel_partition
from parallel.comm import all_gather_equal, all_reduce_sum, shift_next

__all__ = [
    "CPTime",
    "double_counts",
    "gather_time",
    "halve_counts",
    "latent_partition",
    "pixel_partition",
    "shard_time",
]


def shard_time(x: torch.Tensor, counts: list[int], rank: int, dim: int = 2) -> torch.Tensor:
    start = sum(counts[:rank])
    return x.narrow(dim, start, counts[rank])


class CPTime:
    """This rank's piece of the time axis; `counts` are the frames of every rank at the current level."""

    def __init__(self, group: dist.ProcessGroup, counts: list[int]):
        self.group, self.counts = group, list(counts)
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if len(self.counts) != self.size or min(self.counts) < 1:
            raise ValueError(f"frame counts {self.counts} must give each of the {self.size} ranks at least one frame")

    @property
    def total(self) -> int:
        return sum(self.counts)

    def first_apart(self, x: torch.Tensor) -> bool:
        return self.rank == 0 and self.total % 2 == 1

    def halved(self) -> CPTime:
        return CPTime(self.group, halve_counts(self.counts))

    def doubled(self) -> CPTime:
        return CPTime(self.group, double_counts(self.counts))

    def causal_pad(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(B, C, T_local, H, W) -> (B, C, k-1+T_local, H, W) with the k-1 frames that precede this piece."""
        need = k - 1
        if need == 0:
            return x
        if x.shape[2] != self.counts[self.rank]:
            raise ValueError(f"rank {self.rank} holds {x.shape[2]} frames, the plan says {self.counts[self.rank]}")
        pad0 = [x[:, :, :1]] * need if self.rank == 0 else []
        known = torch.cat([*pad0, x], dim=2)
        # frames each rank knows (its own, plus padding on rank 0 or what it received), hop by hop
        have = [self.counts[0] + need] + self.counts[1:]
        got = [need] + [0] * (self.size - 1)
        while min(got) < need:
            send = [min(need, h) for h in have]
            got = [need] + send[:-1]
            have = [have[0]] + [got[r] + self.counts[r] for r in range(1, self.size)]
            shape = (*x.shape[:2], got[self.rank] if self.rank > 0 else 0, *x.shape[3:])
            recv = shift_next(known[:, :, known.shape[2] - send[self.rank] :], shape, self.group)
            # rank 0 receives 0 frames; keeping them in the graph makes every rank run the same backward P2P ops
            known = torch.cat([recv, x] if self.rank > 0 else [recv, known], dim=2)
        return known[:, :, known.shape[2] - need - x.shape[2] :]

    def group_norm(self, x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
        B, C = x.shape[:2]
        G = norm.num_groups
        xg = x.reshape(B, G, -1)  # (B, G, C/G * T_local * H * W)
        n = xg.shape[-1] // x.shape[2] * self.total  # elements per group over the whole time axis
        mean = all_reduce_sum(xg.sum(-1), self.group, "VAE GroupNorm statistics") / n  # (B, G)
        d = xg - mean[..., None]
        var = all_reduce_sum((d * d).sum(-1), self.group, "VAE GroupNorm statistics") / n
        y = (d * torch.rsqrt(var + norm.eps)[..., None]).reshape(x.shape)
        if norm.weight is not None:
            shape = (1, C) + (1,) * (x.dim() - 2)
            y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
        return y


def gather_time(x: torch.Tensor, counts: list[int], group: dist.ProcessGroup, dim: int = 2) -> torch.Tensor:
    """All ranks' pieces concatenated along `dim` (no gradient: for frozen encoders and decoders)."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    longest = max(counts)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x.detach(), x.new_zeros(pad)], dim=dim).contiguous()
    parts = all_gather_equal(padded, group, "VAE frames")
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, counts, strict=True)], dim=dim)
