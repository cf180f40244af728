# The context-parallel implementation of cpdit's sequence seam (cpdit/sequence.py): frames split over the cp ranks
# with SequencePlan, attention by context_parallel_attention. One plan per input shape, cached.
#
# Under train.compile (compiled blocks) the seam's communicating calls are graph breaks, run eagerly: attention
# (ring P2P, Ulysses all-to-all, all-gather, with their autograd Functions), the factorized family's axis switches
# and the frame windows of temporal convolutions. Dynamo would otherwise trace into them and stop at an arbitrary
# point inside (P2P ops, a lock), compiling the fragments around it.
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from cpdit.attn_bias import AttentionBias
from parallel.attention import context_parallel_attention
from parallel.axis_switch import AxisSwitch, CPAxes
from parallel.frame_halo import FrameWindows
from parallel.sequence import SequencePlan


class _CPBound:
    def __init__(self, tokens: SequencePlan, frames: SequencePlan, owner: ContextParallelSequence):
        self.tokens, self.frames, self.owner = tokens, frames, owner
        self._axes: dict[int, CPAxes] = {}
        self._windows: dict[tuple[int, int], FrameWindows] = {}

    def frame_ids(self, device: torch.device) -> torch.Tensor:
        return self.tokens.local_frame_ids(device)

    def shard_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.frames.shard(x, dim)

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.frames.gather(x, dim)

    def axes(self, num_tokens: int) -> CPAxes:
        """Switch between frame shards and spatial-token shards over the cp group (factorized models)."""
        if num_tokens not in self._axes:
            f = self.frames  # frames of cp rank r = f.segments[r], r the rank in the flattened cp group
            frames = [[i for a, b in segs for i in range(a, b)] for segs in f.segments]
            self._axes[num_tokens] = CPAxes(AxisSwitch(frames, num_tokens, f.cp_group))
        return self._axes[num_tokens]

    @torch.compiler.disable
    def windows(self, x: torch.Tensor, before: int, after: int) -> list[torch.Tensor]:
        """Frame windows for temporal convolutions, neighbours fetched from the ranks that hold them."""
        key = (before, after)
        if key not in self._windows:
            f = self.frames
            self._windows[key] = FrameWindows(f.segments, f.cp_rank, f.cp_group, before, after)
        return self._windows[key](x)

    @torch.compiler.disable
    def attention(
        self, q, k, v, *, causal: bool = False, bias: AttentionBias | None = None, scale: float | None = None
    ) -> torch.Tensor:
        o = self.owner
        return context_parallel_attention(
            q, k, v, self.tokens, causal=causal, strategy=o.strategy, scale=scale, head_chunks=o.head_chunks, bias=bias
        )


class ContextParallelSequence:
    """The sequence seam over a (cp_ring, cp_ulysses) mesh.

    Args:
        cp_mesh: `ParallelMesh.cp_mesh()`.
        strategy: attention strategy (auto, ring, ulysses, usp, allgather).
        layout: contiguous or zigzag frames per rank.
        head_chunks: ring passes per attention call (None: the default of parallel.attention).
    """

    def __init__(
        self,
        cp_mesh: DeviceMesh,
        strategy: str = "auto",
        layout: str = "contiguous",
        head_chunks: int | None = None,
    ):
        self.cp_mesh, self.strategy, self.layout = cp_mesh, strategy, layout
        self.head_chunks = head_chunks
        self._plans: dict[tuple[int, int, int], _CPBound] = {}

    def bind(self, num_frames: int, tokens_per_frame: int, text_len: int) -> _CPBound:
        key = (num_frames, tokens_per_frame, text_len)
        if key not in self._plans:
            tokens = SequencePlan(num_frames, tokens_per_frame, text_len, self.cp_mesh, self.layout)
            frames = SequencePlan(num_frames, 1, 0, self.cp_mesh, self.layout)  # same partition, one row per frame
            self._plans[key] = _CPBound(tokens, frames, self)
        return self._plans[key]

    def frames(self, num_frames: int) -> _CPBound:
        return self.bind(num_frames, 1, 0)  # the partition depends on the frame count only
