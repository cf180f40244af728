# Text conditioning. The default encoder needs no pretrained weights: words are hashed into buckets of a trainable
# embedding table, plus a learned position embedding (so "moving left" differs from "left moving").
from __future__ import annotations

import re
import zlib

import torch
import torch.nn as nn

_WORD = re.compile(r"[a-z0-9]+")


def hash_tokens(caption: str, buckets: int, max_length: int) -> list[int]:
    """Word ids in 1..buckets-1 (0 is padding), truncated/padded to max_length."""
    ids = [1 + zlib.crc32(w.encode()) % (buckets - 1) for w in _WORD.findall(caption.lower())][:max_length]
    return ids + [0] * (max_length - len(ids))


class HashedTextEncoder(nn.Module):
    """captions (list of B strings) -> (B, max_length, dim). Trainable; padding positions embed to zero."""

    def __init__(self, dim: int, max_length: int = 16, buckets: int = 4096):
        super().__init__()
        self.buckets, self.max_length = buckets, max_length
        self.words = nn.Embedding(buckets, dim, padding_idx=0)
        self.positions = nn.Embedding(max_length, dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([hash_tokens(c, self.buckets, self.max_length) for c in captions], dtype=torch.long)

    def forward(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenize(captions).to(self.words.weight.device)  # (B, L)
        mask = (ids > 0).unsqueeze(-1).to(self.words.weight.dtype)
        pos = self.positions.weight[None, : ids.shape[1]]  # (1, L, dim)
        return self.words(ids) + pos * mask

    @torch.no_grad()
    def init_weights(self, seed: int = 0, assign=None) -> None:
        gen = torch.Generator().manual_seed(seed + 7)
        assign = assign or (lambda p, v: p.copy_(v.to(p.device)))
        words = torch.randn(self.words.weight.shape, generator=gen) * 0.5
        words[0] = 0
        assign(self.words.weight, words.to(self.words.weight.dtype))
        assign(
            self.positions.weight,
            (torch.randn(self.positions.weight.shape, generator=gen) * 0.1).to(self.positions.weight.dtype),
        )
