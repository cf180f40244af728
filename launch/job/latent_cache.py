# An on-disk cache of the frozen VAE's posterior for every clip (data.latent_cache_dir): one safetensors file of
# (mean, logvar) per clip, named by a fingerprint of everything that determines it (VAE weights and config, dataset,
# frames, size, crop) and the clip index, written atomically (temporary file + rename). A cached clip skips the
# VAE; the posterior sample is still drawn each step with the step's generator, so training is the same with or
# without the cache. Under a context-parallel VAE the ranks of a cp group agree on hit or miss (one tiny
# all-reduce), because a miss is a collective encode.
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from cpdit.safe_paths import inside
from parallel.comm import agree


def fingerprint(cfg) -> str:
    f, d = cfg.first_stage, cfg.data
    what = {
        "first_stage": [f.kind, f.ckpt_path, f.preset, cfg.train.seed if not f.ckpt_path else None]
        + (["diffusers batches"] if f.semantics == "diffusers" else []),
        "data": [d.dataset, d.path, d.num_frames, d.height, d.width, d.fps, d.random_crop, d.num_samples],
        "seed": cfg.train.seed,
    }
    if f.ckpt_path:  # the weights themselves, by size and mtime of each file
        files = sorted(p for p in Path(f.ckpt_path).rglob("*") if p.is_file())
        what["weights"] = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class LatentCache:
    def __init__(self, directory: str | Path, key: str, writer: bool, group: dist.ProcessGroup | None):
        self.dir, self.key, self.writer, self.group = Path(directory), key, writer, group
        self.hits = self.misses = 0
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.dir / f"{self.key}-{index:08d}.safetensors"

    def _agree(self, hit: bool) -> bool:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return hit
        return bool(agree([hit], "min", "latent cache hit", self.group)[0])

    def _load(self, ids: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            items = [load_file(str(inside(self.dir, self.path(i).name))) for i in ids]  # a symlink: a miss
        except (OSError, ValueError, RuntimeError):
            return None  # missing or damaged: encode again
        mean = torch.stack([t["mean"] for t in items]).to(device)  # (B, C, T, h, w)
        return mean, torch.stack([t["logvar"] for t in items]).to(device)

    def encode(self, stage, video: torch.Tensor, ids: list[int], generator: torch.Generator | None) -> torch.Tensor:
        loaded = self._load(ids, video.device) if all(self.path(i).is_file() for i in ids) else None
        if self._agree(loaded is not None):
            self.hits += len(ids)
            return stage.latents(*loaded, generator)
        self.misses += len(ids)
        mean, logvar = stage.moments(video)
        if self.writer:
            for b, i in enumerate(ids):
                tmp = self.path(i).with_suffix(f".tmp{os.getpid()}")
                save_file({"mean": mean[b].contiguous().cpu(), "logvar": logvar[b].contiguous().cpu()}, str(tmp))
                tmp.replace(self.path(i))
        return stage.latents(mean, logvar, generator)
