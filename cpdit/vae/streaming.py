# Exact frame-chunked VAE evaluation on one device ("fake context parallel" that gives the unchunked result): the
# clip is cut into chunks of whole latent frames (the first chunk with CogVideoX's lone first frame, as cp rank 0)
# and the network runs chunk after chunk with a carried causal-conv cache, so only one chunk's activations are
# alive at a time. GroupNorm needs statistics over the whole clip, which a single pass cannot know before it has
# seen every frame; so the run makes one pass per GroupNorm: pass k streams every chunk up to the k-th GroupNorm
# (using the statistics of norms 1..k-1 found by earlier passes) and accumulates that norm's sums, and a last pass
# produces the output. Memory is bounded by a chunk; time is about (number of norms / 2) x the unchunked run.
# (diffusers' chunked encode/decode instead normalises each chunk by its own statistics, which changes the result.)
from __future__ import annotations

from collections.abc import Callable

import torch

from cpdit.vae.time import double_counts, halve_counts


class _NeedStatistics(Exception):
    """Raised by a GroupNorm whose clip statistics are not known yet: ends this chunk's pass."""


class _Run:
    def __init__(self):
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # (mean, var) per GroupNorm call, (B, G) each
        self.sums: list[torch.Tensor] | None = None  # [sum x, sum x^2, count] of the norm being measured
        self.cache: dict[int, torch.Tensor] = {}  # causal-pad call index -> last k-1 input frames
        self.pads = self.norms = 0

    def start_chunk(self) -> None:
        self.pads = self.norms = 0


class StreamingTime:
    """Time-axis seam for one chunk of a streaming run; `counts` are the frames of every chunk at this level."""

    def __init__(self, run: _Run, chunk: int, counts: list[int]):
        self.run, self.chunk, self.counts = run, chunk, counts

    def first_apart(self, x: torch.Tensor) -> bool:
        return self.chunk == 0 and sum(self.counts) % 2 == 1

    def halved(self) -> StreamingTime:
        return StreamingTime(self.run, self.chunk, halve_counts(self.counts))

    def doubled(self) -> StreamingTime:
        return StreamingTime(self.run, self.chunk, double_counts(self.counts))

    def causal_pad(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if k == 1:
            return x
        run, i = self.run, self.run.pads
        run.pads += 1
        prefix = run.cache[i] if self.chunk > 0 else torch.cat([x[:, :, :1]] * (k - 1), dim=2)
        padded = torch.cat([prefix, x], dim=2)
        run.cache[i] = padded[:, :, -(k - 1) :]  # for the next chunk at this call site
        return padded

    def group_norm(self, x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
        run, i = self.run, self.run.norms
        run.norms += 1
        B, C = x.shape[:2]
        G = norm.num_groups
        xg = x.reshape(B, G, -1)
        if i == len(run.stats):  # measuring this norm in this pass
            sums = [xg.double().sum(-1), xg.double().square().sum(-1), torch.tensor(float(xg.shape[-1]))]
            run.sums = sums if run.sums is None else [a + b for a, b in zip(run.sums, sums, strict=True)]
            raise _NeedStatistics
        mean, var = run.stats[i]
        y = ((xg - mean[..., None].to(x.dtype)) * torch.rsqrt(var[..., None] + norm.eps).to(x.dtype)).reshape(x.shape)
        if norm.weight is not None:
            shape = (1, C) + (1,) * (x.dim() - 2)
            y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
        return y


@torch.no_grad()
def stream(fn: Callable[[torch.Tensor, StreamingTime], torch.Tensor], x: torch.Tensor, counts: list[int]):
    """fn(x_chunk, t) over the chunks of x (B, C, T, H, W) with `counts` frames each; the outputs concatenated in
    time, equal to fn(x, LocalTime())."""
    run = _Run()
    chunks = x.split(counts, dim=2)
    while True:
        run.cache, run.sums, outs = {}, None, []
        for i, chunk in enumerate(chunks):
            run.start_chunk()
            try:
                outs.append(fn(chunk, StreamingTime(run, i, counts)))
            except _NeedStatistics:
                pass
        if run.sums is None:
            return torch.cat(outs, dim=2)
        s1, s2, n = run.sums
        mean = s1 / n
        run.stats.append((mean, (s2 / n - mean.square()).clamp_min(0)))
