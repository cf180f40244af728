# An on-disk cache of the frozen VAE's posterior for every clip (data.latent_cache_dir): one safetensors file of
# (mean, logvar) per clip, named by a fingerprint of everything that determines it (VAE weights and config, dataset,
# frames, size, crop) and the clip index, written atomically (temporary file + rename). A cached clip skips the
# VAE; the posterior sample is still drawn each step with the step's generator, so training is the same with or
# without the cache. An image-to-video model's entry also keeps the posterior of the clip's first frame noised with
# the clip's own noise (train.image_noise=clip; launch/job/image_cond.py). Under a context-parallel VAE the ranks of
# a cp group agree on hit or miss (one tiny all-reduce), because a miss is a collective encode.
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cpdit.safe_paths import inside
from parallel.comm import agree


def first_stage_identity(cfg) -> list:
    """What a first stage's posteriors depend on: its weights (a checkpoint, or a preset initialised from the seed)
    and how clips are batched through it."""
    f = cfg.first_stage
    return [f.kind, f.ckpt_path, f.preset, cfg.train.seed if not f.ckpt_path else None] + (
        ["diffusers batches"] if f.semantics == "diffusers" else []
    )


def fingerprint(cfg, image: bool) -> str:
    """`image`: the entries of an image-to-video model (with the noised first frame's posterior)."""
    f, d = cfg.first_stage, cfg.data
    what = {
        "first_stage": first_stage_identity(cfg),
        "data": [d.dataset, d.path, d.num_frames, d.height, d.width, d.fps, d.random_crop, d.num_samples],
        **({"buckets": [d.buckets, d.bucket_weights]} if d.buckets else {}),
        "seed": cfg.train.seed,
    }
    if image:
        what["image"] = ["first frame", cfg.train.image_noise]
    if f.ckpt_path:  # the weights themselves, by size and mtime of each file
        files = sorted(p for p in Path(f.ckpt_path).rglob("*") if p.is_file())
        what["weights"] = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


CLIP_KEYS = ("mean", "logvar")  # the clip's posterior, each (C, T, h, w), unscaled
IMAGE_KEYS = ("image_mean", "image_logvar")  # its noised first frame's, each (C, 1, h, w)


class LatentCache:
    def __init__(
        self, directory: str | Path, key: str, writer: bool, group: dist.ProcessGroup | None, image: bool = False
    ):
        self.dir, self.key, self.writer, self.group = Path(directory), key, writer, group
        self.keys = CLIP_KEYS + (IMAGE_KEYS if image else ())
        self.hits = self.misses = 0
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.dir / f"{self.key}-{index:08d}.safetensors"

    def _agree(self, hit: bool) -> bool:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return hit
        return bool(agree([hit], "min", "latent cache hit", self.group)[0])

    def _load(self, ids: list[int], device: torch.device) -> dict[str, torch.Tensor] | None:
        try:
            items = [load_file(str(inside(self.dir, self.path(i).name))) for i in ids]  # a symlink: a miss
        except (OSError, ValueError, RuntimeError, SafetensorError):
            return None  # missing or damaged: encode again
        if any(set(t) != set(self.keys) for t in items):
            return None  # another kind of entry: encode again
        return {k: torch.stack([t[k] for t in items]).to(device) for k in self.keys}  # each (B, ...)

    def entries(self, ids: list[int], device: torch.device, compute) -> dict[str, torch.Tensor]:
        """Collective over the group: clips `ids`' entries (each (B, ...)), read, or on a miss `compute()`d (a
        collective encode) and written by the writer, whose computed entries must hold every key."""
        loaded = self._load(ids, device) if all(self.path(i).is_file() for i in ids) else None
        if self._agree(loaded is not None):
            self.hits += len(ids)
            return loaded
        self.misses += len(ids)
        computed = compute()
        if self.writer:
            for b, i in enumerate(ids):
                tmp = self.path(i).with_suffix(f".tmp{os.getpid()}")
                save_file({k: computed[k][b].contiguous().cpu() for k in self.keys}, str(tmp))
                tmp.replace(self.path(i))
        return computed
