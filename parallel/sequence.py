# How a video's token sequence [text (L) | frame 0 | ... | frame T-1] is split over the context-parallel ranks:
# whole frames per rank (contiguous blocks or zigzag chunks), the text prefix replicated on every cp rank.
#
# Gradient convention for replicated tokens (text): each rank's copy carries a *partial* gradient and the true
# gradient is the sum over the cp ranks — which is exactly what the parameter-gradient reduction over
# dp x cp does. Frames are owned by one rank and carry their full gradient there.
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from cpdit.partition import Segment, frame_partition
from parallel.comm import all_to_all_tensors

__all__ = ["Segment", "SequencePlan", "frame_partition"]


def _frames(segs: list[Segment]) -> list[int]:
    return [f for a, b in segs for f in range(a, b)]


@dataclass
class SequencePlan:
    """Which frames each context-parallel rank holds.

    Args:
        num_frames: latent frames T of the full video.
        tokens_per_frame: tokens of one frame after patchifying (H/p * W/p).
        text_len: text tokens L in front of the video tokens (replicated on every cp rank).
        cp_mesh: the 2-D (cp_ring, cp_ulysses) mesh of `ParallelDims.build_mesh()`; None for one rank.
        layout: "contiguous" or "zigzag".
    """

    num_frames: int
    tokens_per_frame: int
    text_len: int
    cp_mesh: DeviceMesh | None = None
    layout: str = "contiguous"
    segments: list[list[Segment]] = field(init=False)

    def __post_init__(self) -> None:
        for name in ("num_frames", "tokens_per_frame"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.text_len < 0:
            raise ValueError(f"text_len={self.text_len} must be >= 0")
        if self.cp_mesh is None:
            self.ring_size = self.ulysses_size = 1
            self.ring_rank = self.ulysses_rank = 0
        else:
            if self.cp_mesh.mesh_dim_names != ("cp_ring", "cp_ulysses"):
                raise ValueError(
                    f"cp_mesh dims {self.cp_mesh.mesh_dim_names} must be ('cp_ring', 'cp_ulysses'); pass "
                    "ParallelMesh.cp_mesh()"
                )
            self.ring_size, self.ulysses_size = self.cp_mesh.shape
            self.ring_rank = self.cp_mesh.get_local_rank("cp_ring")
            self.ulysses_rank = self.cp_mesh.get_local_rank("cp_ulysses")
        self.cp_size = self.ring_size * self.ulysses_size
        self.cp_rank = self.ring_rank * self.ulysses_size + self.ulysses_rank  # = flattened "cp" index
        self.segments = frame_partition(self.num_frames, self.cp_size, self.layout)

    # ---- groups (resolved once per plan: attention asks for them on every call) -------------------
    @cached_property
    def ring_group(self) -> dist.ProcessGroup | None:
        return None if self.cp_mesh is None else self.cp_mesh.get_group("cp_ring")

    @cached_property
    def ulysses_group(self) -> dist.ProcessGroup | None:
        return None if self.cp_mesh is None else self.cp_mesh.get_group("cp_ulysses")

    @cached_property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The flattened (ring x ulysses) group; cp index = ring_rank * ulysses_size + ulysses_rank."""
        if self.cp_mesh is None:
            return None
        if self.ring_size == 1:
            return self.ulysses_group
        if self.ulysses_size == 1:
            return self.ring_group
        return self.cp_mesh._flatten("cp").get_group()

    # ---- frames ------------------------------------------------------------------------------------
    def local_segments(self, cp_rank: int | None = None) -> list[Segment]:
        return self.segments[self.cp_rank if cp_rank is None else cp_rank]

    def num_local_frames(self, cp_rank: int | None = None) -> int:
        return sum(b - a for a, b in self.local_segments(cp_rank))

    def local_len(self, cp_rank: int | None = None) -> int:
        """Tokens on a cp rank: text + its frames."""
        return self.text_len + self.num_local_frames(cp_rank) * self.tokens_per_frame

    @property
    def full_len(self) -> int:
        return self.text_len + self.num_frames * self.tokens_per_frame

    def local_frame_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global frame index of each local frame, in local row order (for RoPE / positional embeddings)."""
        return torch.tensor(_frames(self.local_segments()), dtype=torch.long, device=device)

    def local_token_frame_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global frame index of each local video token (text excluded), shape (T_local * tokens_per_frame,)."""
        return self.local_frame_ids(device).repeat_interleave(self.tokens_per_frame)

    def _check_len(self, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
        if x.shape[dim] != expected:
            raise ValueError(
                f"{what}: dim {dim} has {x.shape[dim]} tokens, expected {expected} (text_len={self.text_len} + "
                f"frames x tokens_per_frame={self.tokens_per_frame})"
            )

    def _video_rows(self, segs: list[Segment]) -> list[tuple[int, int]]:
        tpf, L = self.tokens_per_frame, self.text_len
        return [(L + a * tpf, L + b * tpf) for a, b in segs]

    # ---- shard / gather ----------------------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Full sequence (..., L + T*tpf, ...) along `dim` -> this rank's (..., L + T_local*tpf, ...).

        Backward: the local gradient is placed at this rank's rows, zeros elsewhere; the text gradient passes
        through (partial-gradient convention: the sum over cp ranks is the true gradient)."""
        self._check_len(x, dim, self.full_len, "shard")
        return _Shard.apply(x, self, dim)

    def gather(self, x_local: torch.Tensor, dim: int) -> torch.Tensor:
        """Inverse of `shard`: (..., L + T_local*tpf, ...) -> the full (..., L + T*tpf, ...) on every cp rank.

        Backward assumes the use after it is replicated on the cp ranks (identical gradient everywhere): each
        rank keeps the gradient of its own frames (= `shard`) and 1/cp of the text gradient."""
        self._check_len(x_local, dim, self.local_len(), "gather")
        return _Gather.apply(x_local, self, dim)

    def _take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [x.narrow(dim, 0, self.text_len)]
        parts += [x.narrow(dim, a, b - a) for a, b in self._video_rows(self.local_segments())]
        return torch.cat(parts, dim)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: SequencePlan, dim: int):
        ctx.plan, ctx.dim, ctx.shape = plan, dim, x.shape
        return plan._take(x, dim)

    @staticmethod
    def backward(ctx, grad):
        plan, dim = ctx.plan, ctx.dim
        full = grad.new_zeros(ctx.shape)
        L = plan.text_len
        full.narrow(dim, 0, L).copy_(grad.narrow(dim, 0, L))
        row = L
        for a, b in plan._video_rows(plan.local_segments()):
            full.narrow(dim, a, b - a).copy_(grad.narrow(dim, row, b - a))
            row += b - a
        return full, None, None


def _gather_frames(x_local: torch.Tensor, plan: SequencePlan, dim: int) -> torch.Tensor:
    """All cp ranks' video rows of x_local along `dim`, assembled in global frame order."""
    L, tpf = plan.text_len, plan.tokens_per_frame
    video = x_local.narrow(dim, L, x_local.shape[dim] - L).movedim(dim, 0).contiguous()  # (N_r, ...)
    rest = tuple(video.shape[1:])
    shapes = [(plan.num_local_frames(r) * tpf, *rest) for r in range(plan.cp_size)]
    group = plan.cp_group
    parts = [video] if group is None else all_to_all_tensors([video] * plan.cp_size, shapes, group)
    full = video.new_empty((plan.num_frames * tpf, *rest))
    for r, part in enumerate(parts):
        row = 0
        for a, b in plan.local_segments(r):
            full[a * tpf : b * tpf] = part[row : row + (b - a) * tpf]
            row += (b - a) * tpf
    return full.movedim(0, dim)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, plan: SequencePlan, dim: int):
        ctx.plan, ctx.dim = plan, dim
        video = _gather_frames(x_local, plan, dim)
        return torch.cat([x_local.narrow(dim, 0, plan.text_len), video], dim)

    @staticmethod
    def backward(ctx, grad):
        plan, dim = ctx.plan, ctx.dim
        local = plan._take(grad, dim).clone()
        local.narrow(dim, 0, plan.text_len).div_(plan.cp_size)
        return local, None, None
