# diffusers' batched evaluation of the CogVideoX VAE, reproduced exactly for users whose latents were computed with
# diffusers (`first_stage.semantics=diffusers`). diffusers' AutoencoderKLCogVideoX encodes frames in batches of 8
# (the first batch also takes the remainder: 49 frames = 9 + 8 x 5) and decodes latents in batches of 2 (13 = 3 +
# 2 x 5). The causal convolutions carry their last frames from batch to batch (so they see the same inputs as on the
# whole clip), but each batch is a clip of its own for GroupNorm statistics and for the frame kept apart when time
# is halved or doubled. cpdit's default semantics (cpdit/vae/time.py, CogVideoX's own context-parallel VAE) use the
# whole clip for both; the two agree up to one batch (15 frames, 3 latents).
from __future__ import annotations

import torch

from cpdit.vae.time import LocalTime


def diffusers_batches(frames: int, per_batch: int) -> list[int]:
    """Sizes of diffusers' batches of `frames`: max(frames // per_batch, 1) of them, the first with the remainder."""
    n = max(frames // per_batch, 1)
    if n == 1:
        return [frames]
    return [per_batch + frames % per_batch] + [per_batch] * (n - 1)


class BatchedTime(LocalTime):
    """Time seam of one batch: local GroupNorm statistics and first-frame rule (LocalTime), causal padding from the
    previous batch's last frames (`cache`, shared by the batches of one run, keyed by call order)."""

    def __init__(self, cache: dict[int, torch.Tensor], first: bool):
        self.cache, self.first, self.pads = cache, first, 0

    def causal_pad(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if k == 1:
            return x
        i = self.pads
        self.pads += 1
        prefix = torch.cat([x[:, :, :1]] * (k - 1), dim=2) if self.first else self.cache[i]
        padded = torch.cat([prefix, x], dim=2)
        self.cache[i] = padded[:, :, -(k - 1) :]
        return padded


@torch.no_grad()
def run_batched(fn, x: torch.Tensor, per_batch: int) -> torch.Tensor:
    """fn(batch, t) over diffusers' batches of x (B, C, T, H, W), outputs concatenated in time."""
    cache: dict[int, torch.Tensor] = {}
    outs = [
        fn(b, BatchedTime(cache, i == 0)) for i, b in enumerate(x.split(diffusers_batches(x.shape[2], per_batch), 2))
    ]
    return torch.cat(outs, dim=2)
