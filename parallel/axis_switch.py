# Switching the sharded axis of a video between frames and spatial tokens ("dynamic sequence parallelism"):
# factorized spatial/temporal transformers attend within a frame (all tokens of the frames a rank holds) and
# across frames (all frames of the tokens a rank holds). One all_to_all_single moves a (B, T_r, S, D) frame shard
# to a (B, T, S_r, D) token shard and back; each rank sends (cp-1)/cp of its activation once per switch instead of
# rotating K/V through every block. Frames follow any frame partition (contiguous or zigzag segment lists);
# tokens are split contiguously, earlier ranks taking the remainder. Uneven T and S work.
from __future__ import annotations

import torch
import torch.distributed as dist

from cpdit.partition import even_split
from parallel.comm import all_to_all_tensors


class AxisSwitch:
    """For one (T, S) shape over `group`: `frames[r]` are the global frame indices rank r holds, in its order."""

    def __init__(self, frames: list[list[int]], num_tokens: int, group: dist.ProcessGroup | None):
        self.frames, self.group = frames, group
        self.size = len(frames)
        self.rank = dist.get_rank(group) if group is not None else 0
        self.tokens = even_split(num_tokens, self.size)
        if min(self.tokens) < 1:
            raise ValueError(f"{num_tokens} spatial tokens cannot be split over {self.size} ranks")
        order = [f for fr in frames for f in fr]  # frames in the order the all-to-all delivers them
        self.num_frames = len(order)
        if sorted(order) != list(range(self.num_frames)):
            raise ValueError(f"frame lists {frames} do not partition 0..{self.num_frames - 1}")
        self.order = torch.tensor(order)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(self.num_frames)

    def _token_slice(self, r: int) -> slice:
        start = sum(self.tokens[:r])
        return slice(start, start + self.tokens[r])

    def frames_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T_r, S, D) -> (B, T, S_r, D)."""
        return _FramesToTokens.apply(x, self)

    def tokens_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, S_r, D) -> (B, T_r, S, D)."""
        return _TokensToFrames.apply(x, self)

    # ---- the two directions without autograd (each is the other's adjoint) ----
    def _f2t(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        B, _, _, D = x.shape
        me = self.rank
        sends = [x[:, :, self._token_slice(j)].contiguous() for j in range(self.size)]  # (B, T_me, S_j, D)
        shapes = [(B, len(self.frames[j]), self.tokens[me], D) for j in range(self.size)]
        out = torch.cat(all_to_all_tensors(sends, shapes, self.group), dim=1)  # (B, T, S_me, D), delivery order
        return out.index_select(1, self.inverse.to(out.device))  # global frame order

    def _t2f(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        B, _, _, D = x.shape
        me = self.rank
        x = x.index_select(1, self.order.to(x.device))  # delivery order: rank 0's frames, rank 1's, ...
        counts = [len(f) for f in self.frames]
        sends = [p.contiguous() for p in x.split(counts, dim=1)]  # (B, T_j, S_me, D)
        shapes = [(B, counts[me], self.tokens[j], D) for j in range(self.size)]
        return torch.cat(all_to_all_tensors(sends, shapes, self.group), dim=2)  # (B, T_me, S, D)


class _FramesToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, switch: AxisSwitch):
        ctx.switch = switch
        return switch._f2t(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.switch._t2f(grad.contiguous()), None


class _TokensToFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, switch: AxisSwitch):
        ctx.switch = switch
        return switch._t2f(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.switch._f2t(grad.contiguous()), None


class CPAxes:
    """The axis seam of cpdit/models/factorized/layers.py over a cp group: spatial blocks on frame shards, temporal
    blocks on spatial-token shards, one all-to-all at each switch."""

    def __init__(self, switch: AxisSwitch):
        self.switch = switch

    @torch.compiler.disable  # a graph break under compiled blocks (parallel/cp_sequence.py)
    def to_temporal(self, x: torch.Tensor) -> torch.Tensor:
        return self.switch.frames_to_tokens(x)

    @torch.compiler.disable
    def to_spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.switch.tokens_to_frames(x)

    def frame_ids(self, num_frames: int, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.switch.frames[self.switch.rank], device=device)
