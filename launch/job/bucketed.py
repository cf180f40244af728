# The datasets of a bucketed run (data.buckets): each clip has a bucket (`bucket_of[i]`, None: skipped) and comes
# at its bucket's shape. The synthetic datasets draw each clip's bucket; a folder's video goes to the bucket it fits
# (launch/job/buckets.py assign), read from its container's metadata without decoding it.
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from launch.job.buckets import Bucket, assign
from launch.job.data import SYNTHETIC, VideoFolder

log = logging.getLogger("cpdit.data")


class SyntheticBuckets(torch.utils.data.Dataset):
    """Synthetic clips of several shapes: clip i's bucket is drawn from (seed, i) with the shares `weights`; its
    caption and motion are those of clip i at any shape (data.py's SyntheticShapes or its I2V variant)."""

    def __init__(self, kind: str, num_samples: int, buckets: list[Bucket], weights: list[float] | None, seed: int):
        p = np.asarray(weights if weights is not None else [1.0] * len(buckets), dtype=np.float64)
        rng = np.random.default_rng([seed, 0x6275636B])  # "buck": a stream of its own
        self.bucket_of: list[int | None] = [int(b) for b in rng.choice(len(buckets), size=num_samples, p=p / p.sum())]
        self.shapes = [SYNTHETIC[kind](num_samples, b.frames, b.height, b.width, seed) for b in buckets]
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.bucket_of)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.shapes[self.bucket_of[i]][i]


def probe(path, fps: float) -> tuple[int, int, int]:
    """(frames at `fps`, height, width) of a video from its container's metadata."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), "ffmpeg")
    try:
        meta = reader.get_meta_data()
    finally:
        reader.close()
    src_fps = float(meta.get("fps") or fps)
    n = meta.get("nframes")
    if not isinstance(n, int | float) or not math.isfinite(n):
        n = round(float(meta.get("duration") or 0) * src_fps)
    stride = max(1, round(src_fps / fps))
    width, height = meta["size"]
    return math.ceil(int(n) / stride), int(height), int(width)


class BucketedFolder(VideoFolder):
    """The CogVideoX fine-tuning layout with data.buckets: each video goes to the bucket of nearest aspect ratio,
    then the longest it covers, and is loaded resized and cropped to it; a video shorter than every bucket, or whose
    metadata cannot be read, is skipped and counted. A stand-in for an unreadable clip comes from its bucket."""

    def __init__(self, root, buckets: list[Bucket], fps: float, random_crop: bool = False, seed: int = 0):
        b0 = buckets[0]
        super().__init__(root, b0.frames, b0.height, b0.width, fps, random_crop=random_crop, seed=seed)
        self.buckets = buckets
        self.bucket_of = []
        for path, _ in self.items:
            try:
                self.bucket_of.append(assign(*probe(path, fps), buckets))
            except Exception as err:  # unreadable container: skipped like a video that fails to decode
                log.warning("skipping %s: cannot read its metadata (%s)", path, err)
                self.bucket_of.append(None)
        self.skipped = sum(b is None for b in self.bucket_of)
        if self.skipped:
            log.warning(
                "data.buckets: %d of %d videos fit no bucket (shorter than every bucket at %g fps) and are skipped",
                self.skipped,
                len(self.items),
                fps,
            )

    def shape_of(self, i: int) -> tuple[int, int, int] | None:
        b = self.bucket_of[i]
        return None if b is None else (self.buckets[b].frames, self.buckets[b].height, self.buckets[b].width)

    def counts(self) -> list[int]:
        return [sum(b == i for b in self.bucket_of) for i in range(len(self.buckets))]


def build_bucketed(cfg, buckets: list[Bucket], seed: int):
    d = cfg.data
    if d.dataset in SYNTHETIC:
        return SyntheticBuckets(d.dataset, d.num_samples, buckets, d.bucket_weights, seed)
    return BucketedFolder(d.path, buckets, d.fps, random_crop=d.random_crop, seed=seed)
