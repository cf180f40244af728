# Text conditioning. The default encoder needs no pretrained weights: words are hashed into buckets of a trainable
# embedding table, plus a learned position embedding (so "moving left" differs from "left moving").
from __future__ import annotations

import os
import re
import zlib

import torch
import torch.nn as nn

from cpdit.safe_paths import inside, plain_tree
from cpdit.seeding import generator

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
        gen = generator(seed, "text encoder")
        assign = assign or (lambda p, v: p.copy_(v.to(p.device)))
        words = torch.randn(self.words.weight.shape, generator=gen) * 0.5
        words[0] = 0
        assign(self.words.weight, words.to(self.words.weight.dtype))
        assign(
            self.positions.weight,
            (torch.randn(self.positions.weight.shape, generator=gen) * 0.1).to(self.positions.weight.dtype),
        )


class T5TextEncoder(nn.Module):
    """Frozen T5 encoder (transformers' T5EncoderModel + its tokenizer) from a local directory, as CogVideoX
    conditions on T5-XXL: captions padded/truncated to `max_length` (226) tokens. Embeddings are cached on disk
    (one safetensors file per caption, keyed by a hash of the caption, the model path and max_length)."""

    def __init__(self, path: str, max_length: int = 226, cache_dir: str | None = None):
        super().__init__()
        from pathlib import Path

        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as err:
            raise ImportError(f"text.encoder='t5' needs transformers ({err}): pip install 'cpdit[t5]'") from err

        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder path {path!r} has no config.json (a local T5 directory is needed; nothing is downloaded)"
            )
        plain_tree(path)  # transformers reads the files itself: no symlink anywhere under the directory
        self.path, self.max_length = str(path), max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except Exception as err:  # truncated weights, missing tokenizer files, wrong architecture
            raise RuntimeError(
                f"text encoder path {path!r}: could not load a T5 encoder and its tokenizer "
                f"({type(err).__name__}: {err}); it needs config.json, *.safetensors and the tokenizer files"
            ) from err
        self.model.requires_grad_(False).eval()
        self.cache = Path(cache_dir) if cache_dir else None

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def token_mask(self, captions: list[str]) -> torch.Tensor:
        """(B, max_length) bool: which positions hold a token of the caption (with its end token), not padding.
        CogVideoX conditions on all max_length positions; the mask is kept with precomputed embeddings."""
        tok = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, add_special_tokens=True
        )
        return torch.tensor(tok["attention_mask"], dtype=torch.bool)

    def _key(self, caption: str) -> str:
        import hashlib

        return hashlib.sha1(f"{self.path}|{self.max_length}|{caption}".encode()).hexdigest()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        device = next(self.model.parameters()).device
        out: list[torch.Tensor | None] = [None] * len(captions)
        if self.cache is not None:
            for i, c in enumerate(captions):
                f = self.cache / f"{self._key(c)}.safetensors"
                if f.is_file() and not f.is_symlink():  # a planted link is never read; the entry is written anew
                    try:
                        out[i] = load_file(str(inside(self.cache, f.name)))["embedding"].to(device)
                    except (OSError, KeyError, SafetensorError):  # damaged or foreign: encoded and written anew
                        pass
        todo = [i for i, e in enumerate(out) if e is None]
        if todo:
            tok = self.tokenizer(
                [captions[i] for i in todo],
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            emb = self.model(tok.input_ids.to(device)).last_hidden_state  # (n, max_length, d_model)
            for j, i in enumerate(todo):
                out[i] = emb[j]
                if self.cache is not None:
                    self.cache.mkdir(parents=True, exist_ok=True)
                    f = self.cache / f"{self._key(captions[i])}.safetensors"
                    tmp = f.with_suffix(f".tmp{os.getpid()}")
                    save_file({"embedding": emb[j].cpu().contiguous()}, str(tmp))
                    tmp.replace(f)  # renames over a symlink, never writes through it
        return torch.stack(out)  # (B, max_length, d_model)
