# The single-device sides of the seams a model calls when it needs to know how its work is split, beside the
# sequence seam (cpdit/sequence.py). parallel/ swaps in their twins (the table in parallel/__init__.py): every method
# here is the identity, or the whole range, of what the parallel twin computes on this rank's share.
from __future__ import annotations

import torch


class AllHeads:
    """Which head-indexed tensors this process computes (the Phenaki family's `heads` seam). Single device (no
    tensor parallelism): every head is local. Twin: parallel/tensor_parallel.py TPHeads."""

    def local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """A per-head tensor (heads along `dim`) -> the heads this process computes."""
        return t

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter used by every head (its gradient must cover all heads)."""
        return t


class LocalAxes:
    """Frames <-> spatial tokens (the `seq.axes` seam of factorized models). Single device: every frame and every
    spatial token is here. Twin: parallel/axis_switch.py CPAxes."""

    def to_temporal(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def to_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def frame_ids(self, num_frames: int, device: torch.device) -> torch.Tensor:
        """Global indices of the frames of the spatial layout."""
        return torch.arange(num_frames, device=device)
