# Frame windows across context-parallel ranks: each local segment of frames [a, b) extended by the `before` frames
# in front of it and the `after` frames behind it (zeros outside the video), for temporal convolutions such as
# Phenaki's causal positional-encoding generator (PEG). Works for any layout (contiguous, zigzag, uneven): the
# frames a rank lacks are fetched from their owners in one all-to-all with uneven splits, and in the backward their
# gradients travel back to the owners in one all-to-all and are added there.
from __future__ import annotations

import torch

from parallel.comm import all_to_all_tensors
from parallel.progress import in_collective
from parallel.sequence import Segment


class FrameWindows:
    """Args:
    segments: frame segments of each cp rank (SequencePlan.segments); this rank is `rank` of `group`.
    before, after: neighbouring frames fetched on each side of every segment.
    """

    def __init__(self, segments: list[list[Segment]], rank: int, group, before: int, after: int):
        self.segments, self.rank, self.group, self.before, self.after = segments, rank, group, before, after
        self.num_frames = max(b for segs in segments for _, b in segs)
        self.owner: dict[int, tuple[int, int]] = {}  # frame -> (rank, local row)
        for r, segs in enumerate(segments):
            row = 0
            for a, b in segs:
                for f in range(a, b):
                    self.owner[f] = (r, row)
                    row += 1
        self.need = [self._needed(r) for r in range(len(segments))]  # frames each rank fetches, sorted
        me = rank
        self.send_rows = [[self.owner[f][1] for f in self.need[d] if self.owner[f][0] == me] for d in range(self.size)]
        self.recv_frames = [[f for f in self.need[me] if self.owner[f][0] == s] for s in range(self.size)]

    @property
    def size(self) -> int:
        return len(self.segments)

    def _needed(self, r: int) -> list[int]:
        want = set()
        for a, b in self.segments[r]:
            want.update(range(max(a - self.before, 0), a))
            want.update(range(b, min(b + self.after, self.num_frames)))
        return sorted(f for f in want if self.owner[f][0] != r)

    def window_frames(self) -> list[list[int]]:
        """Global frame of every row of every window of this rank (-1: zero padding outside the video)."""
        out = []
        for a, b in self.segments[self.rank]:
            frames = [*range(a - self.before, a), *range(a, b), *range(b, b + self.after)]
            out.append([f if 0 <= f < self.num_frames else -1 for f in frames])
        return out

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, T_r, ...) this rank's frames in local order -> one (B, before + len + after, ...) per segment.
        Collective over the group (every rank calls it, also where it needs nothing)."""
        lengths = [len(w) for w in self.window_frames()]
        return list(_Windows.apply(x, self).split(lengths, dim=1))

    def assemble(self, x: torch.Tensor, fetched: torch.Tensor | None) -> torch.Tensor:
        """(B, sum of window lengths, ...) from the local frames and the fetched ones."""
        where = {f: i for i, f in enumerate(self.need[self.rank])}
        zero = x.new_zeros((x.shape[0], 1, *x.shape[2:]))
        parts = []
        for f in (f for w in self.window_frames() for f in w):
            if f < 0:
                parts.append(zero)
            elif self.owner[f][0] == self.rank:
                row = self.owner[f][1]
                parts.append(x[:, row : row + 1])
            else:
                parts.append(fetched[:, where[f] : where[f] + 1])
        return torch.cat(parts, dim=1)

    def assemble_backward(self, grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the windows' gradient into the local frames' (B, T_r, ...) and the fetched frames'."""
        where = {f: i for i, f in enumerate(self.need[self.rank])}
        dx = torch.zeros_like(x)
        dfetched = grad.new_zeros((grad.shape[0], len(where), *grad.shape[2:]))
        for i, f in enumerate(f for w in self.window_frames() for f in w):
            if f < 0:
                continue
            if self.owner[f][0] == self.rank:
                dx[:, self.owner[f][1]] += grad[:, i]
            else:
                dfetched[:, where[f]] += grad[:, i]
        return dx, dfetched

    # ---- the exchange ------------------------------------------------------------------------------
    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T_r, ...) -> (B, len(need[rank]), ...) the frames this rank fetches, in `need` order."""
        rest = tuple(x.shape[2:])
        sends = [x[:, rows].movedim(1, 0).contiguous() for rows in self.send_rows]  # (n, B, ...)
        shapes = [(len(fr), x.shape[0], *rest) for fr in self.recv_frames]
        with in_collective("all_to_all(frame halo)"):
            recv = all_to_all_tensors(sends, shapes, self.group)
        by_frame = {f: recv[s][i] for s, frames in enumerate(self.recv_frames) for i, f in enumerate(frames)}
        if not self.need[self.rank]:
            return x.new_zeros((x.shape[0], 0, *rest))
        return torch.stack([by_frame[f] for f in self.need[self.rank]], dim=1)

    def exchange_backward(self, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gradient of `exchange`: each fetched frame's gradient goes back to its owner and is added there."""
        where = {f: i for i, f in enumerate(self.need[self.rank])}
        rest = tuple(grad.shape[2:])
        sends = [grad[:, [where[f] for f in frames]].movedim(1, 0).contiguous() for frames in self.recv_frames]
        shapes = [(len(rows), grad.shape[0], *rest) for rows in self.send_rows]
        with in_collective("all_to_all(frame halo backward)"):
            recv = all_to_all_tensors(sends, shapes, self.group)
        out = torch.zeros_like(like)
        for rows, g in zip(self.send_rows, recv, strict=True):
            if rows:
                out.index_add_(1, torch.tensor(rows, device=out.device), g.movedim(0, 1))
        return out


class _Windows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, windows: FrameWindows):
        ctx.windows = windows
        ctx.save_for_backward(x)
        exchange = windows.size > 1 and any(windows.need)
        ctx.exchange = exchange
        return windows.assemble(x, windows.exchange(x) if exchange else None)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        w: FrameWindows = ctx.windows
        dx, dfetched = w.assemble_backward(grad, x)
        if ctx.exchange:
            dx = dx + w.exchange_backward(dfetched.contiguous(), x)
        return dx, None
