# Video datasets for the training job: built-in synthetic moving shapes (the default; nothing downloaded), their
# image-to-video variant, and the CogVideoX fine-tuning layout (videos/*.mp4 + labels/*.txt). Each yields
# (video (F, 3, H, W) in [-1, 1], caption).
# Sampling is by data-parallel rank; the ranks of one cp x tp group read the same clips.
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpdit.seeding import generator

log = logging.getLogger("cpdit.data")

COLORS = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.85, 0.2),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "purple": (0.7, 0.2, 0.9),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _shape_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    return (yy - cy <= r) & (yy - cy >= -r) & (np.abs(xx - cx) <= (yy - cy + r) / 2)  # triangle, apex up


class SyntheticShapes(torch.utils.data.Dataset):
    """Clips of one colored shape crossing a black background, captioned "a red circle moving left". The caption
    determines the clip: the shape (radius 0.35 of the frame side) starts at the edge it moves away from, centred
    across its motion, and travels 0.3 of the frame side. Which of the 72 captions clip i shows depends only on
    (seed, i)."""

    RADIUS = 0.35
    TRAVEL = 0.3

    def __init__(self, num_samples: int, num_frames: int, height: int, width: int, seed: int = 0):
        self.n, self.f, self.h, self.w, self.seed = num_samples, num_frames, height, width, seed
        self.skipped = 0

    def __len__(self) -> int:
        return self.n

    def describe(self, i: int) -> tuple[str, str, str, np.random.Generator]:
        rng = np.random.default_rng([self.seed, i])
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
        return color, shape, motion, rng

    def radius(self) -> float:
        return min(self.h, self.w) * self.RADIUS

    def start(self, motion: str, rng: np.random.Generator) -> tuple[float, float]:
        """(cy, cx) of the shape in frame 0: at the edge it moves away from, centred across its motion."""
        h, w, r = self.h, self.w, self.radius()
        dx, dy = MOTIONS[motion]
        return (h / 2 if dy == 0 else (h - r if dy < 0 else r)), (w / 2 if dx == 0 else (w - r if dx < 0 else r))

    def caption(self, color: str, shape: str, motion: str) -> str:
        return f"a {color} {shape} moving {motion}"

    def render(self, color: str, shape: str, motion: str, cy: float, cx: float) -> torch.Tensor:
        """(F, 3, H, W) in [-1, 1]: the shape centred at (cy, cx) in frame 0, travelling TRAVEL of the frame side."""
        h, w, f, r = self.h, self.w, self.f, self.radius()
        dx, dy = MOTIONS[motion]
        speed = min(h, w) * self.TRAVEL / max(f - 1, 1)
        video = np.zeros((f, 3, h, w), dtype=np.float32)
        rgb = np.asarray(COLORS[color], dtype=np.float32)[:, None]
        for t in range(f):
            video[t][:, _shape_mask(shape, h, w, cy + dy * speed * t, cx + dx * speed * t, r)] = rgb
        return torch.from_numpy(video * 2 - 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        color, shape, motion, rng = self.describe(i)
        cy, cx = self.start(motion, rng)
        return self.render(color, shape, motion, cy, cx), self.caption(color, shape, motion)


class SyntheticShapesI2V(SyntheticShapes):
    """The image-to-video variant (`data.dataset=synthetic_i2v`): the caption names only the motion ("a shape
    moving left"); colour, shape and where the shape starts vary and are seen only in the first frame, the image
    the model is conditioned on. A slightly smaller shape (radius 0.3 of the frame side) travels a little further
    (0.35) from a start drawn uniformly among those that keep it inside the frame all the way: across its motion
    anywhere in the middle 40% of the frame, along it within 5% of the edge it leaves. (A smaller shape, radius 0.22
    travelling 0.45, took the demo model twice the steps to come out as one object.)"""

    RADIUS = 0.3
    TRAVEL = 0.35

    def start(self, motion: str, rng: np.random.Generator) -> tuple[float, float]:
        h, w, r = self.h, self.w, self.radius()
        dx, dy = MOTIONS[motion]
        travel = min(h, w) * self.TRAVEL

        def span(size: int, d: int) -> tuple[float, float]:  # the centre's range along one axis
            lo, hi = r, size - r
            return (lo + travel, hi) if d < 0 else (lo, hi - travel) if d > 0 else (lo, hi)

        (y0, y1), (x0, x1) = span(h, dy), span(w, dx)
        return float(rng.uniform(y0, y1)), float(rng.uniform(x0, x1))

    def caption(self, color: str, shape: str, motion: str) -> str:
        return f"a shape moving {motion}"


class VideoFolder(torch.utils.data.Dataset):
    """CogVideoX fine-tuning layout: `videos/NAME.mp4` with its caption in `labels/NAME.txt`.

    Frames are sampled at `fps` (stride from the file's rate), `num_frames` of them from the start (or a
    random offset with `random_crop`), resized so the short side covers the target, center/random cropped,
    and scaled to [-1, 1]. An unreadable or too short video is skipped with a warning and counted."""

    def __init__(
        self,
        root: str | Path,
        num_frames: int,
        height: int,
        width: int,
        fps: float,
        random_crop: bool = False,
        seed: int = 0,
    ):
        self.root = Path(root)
        videos = self.root / "videos"
        if not videos.is_dir():
            raise FileNotFoundError(
                f"data.path={str(self.root)!r} has no videos/ directory (expected videos/*.mp4 and labels/*.txt)"
            )
        self.items = []
        for v in sorted(videos.glob("*.mp4")):
            label = self.root / "labels" / (v.stem + ".txt")
            if label.is_file():
                self.items.append((v, label))
            else:
                log.warning("no caption for %s (expected %s); skipped", v, label)
        if not self.items:
            raise FileNotFoundError(f"data.path={str(self.root)!r}: no videos/*.mp4 with a labels/*.txt caption")
        self.f, self.h, self.w, self.fps, self.random_crop, self.seed = (
            num_frames,
            height,
            width,
            fps,
            random_crop,
            seed,
        )
        self.skipped = 0
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, i: int, shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, str]:
        """Clip i at `shape` (frames, height, width; None: the dataset's own)."""
        import imageio.v2 as imageio

        f, h, w = shape or (self.f, self.h, self.w)
        path, label = self.items[i]
        reader = imageio.get_reader(str(path), "ffmpeg")
        try:
            src_fps = float(reader.get_meta_data().get("fps") or self.fps)
            stride = max(1, round(src_fps / self.fps))
            frames = [fr for j, fr in enumerate(reader) if j % stride == 0]
        finally:
            reader.close()
        if len(frames) < f:
            raise ValueError(f"{path}: {len(frames)} frames at {self.fps} fps, need {f}")
        rng = np.random.default_rng([self.seed, i])
        start = int(rng.integers(0, len(frames) - f + 1)) if self.random_crop else 0
        video = torch.from_numpy(np.stack(frames[start : start + f])).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self._resize_crop(video[:, :3], rng, h, w), label.read_text().strip()

    def _resize_crop(self, video: torch.Tensor, rng: np.random.Generator, th: int, tw: int) -> torch.Tensor:
        _, _, h, w = video.shape
        scale = max(th / h, tw / w)
        nh, nw = max(th, math.ceil(h * scale)), max(tw, math.ceil(w * scale))
        video = torch.nn.functional.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False)
        top = int(rng.integers(0, nh - th + 1)) if self.random_crop else (nh - th) // 2
        left = int(rng.integers(0, nw - tw + 1)) if self.random_crop else (nw - tw) // 2
        return video[:, :, top : top + th, left : left + tw].clamp(-1, 1)

    def shape_of(self, i: int) -> tuple[int, int, int] | None:
        """The shape clip i is loaded at (None: the dataset's own; a bucketed folder's: its bucket's)."""
        return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        shape = self.shape_of(i)
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            if j in self.bad or self.shape_of(j) != shape:  # a stand-in has the clip's shape
                continue
            try:
                return self._load(j, shape)
            except Exception as err:  # corrupt, truncated or unreadable: skip, count, never crash
                self.bad.add(j)
                self.skipped += 1
                log.warning("skipping unreadable video %s: %s", self.items[j][0], err)
        raise RuntimeError(f"data.path={str(self.root)!r}: every video failed to decode")


@dataclass
class DataPosition:
    """Where the sampler stands, saved in checkpoints and independent of the layout: the epoch, and how many clips
    of that epoch's permutation the data-parallel ranks have taken together (with data.buckets: how many of the
    epoch's bucketed micro-batches, launch/job/buckets.py). A run resumed with another number of data-parallel ranks
    or another batch size continues with the next clip of the same permutation, so within the epoch no clip is seen
    twice or skipped (an epoch ends when the next step's dp x batch clips do not fit; the few left over are skipped,
    as by every layout)."""

    epoch: int = 0
    clips: int = 0
    batches: int = 0

    @classmethod
    def from_meta(cls, meta: dict) -> DataPosition:
        """The position of a checkpoint's meta.json; older checkpoints counted batches per data-parallel rank
        (`index`), converted with the dp size and batch size they were written with."""
        data = meta["data"]
        if "clips" in data:
            return cls(int(data["epoch"]), int(data["clips"]), int(data.get("batches", 0)))
        import re

        import yaml

        m = re.search(r"dp_replicate=(\d+) dp_shard=(\d+)", meta.get("layout", ""))
        dp = int(m[1]) * int(m[2]) if m else 1
        batch = yaml.safe_load(meta.get("config", "{}") or "{}").get("data", {}).get("batch_size", 1)
        return cls(int(data["epoch"]), int(data["index"]) * dp * int(batch))


@dataclass
class MicroBatch:
    """What one micro-step of a data-parallel group takes, and what it needs to know of the whole step."""

    video: torch.Tensor | dict[str, torch.Tensor]
    """(B, F, 3, H, W) in [-1, 1], or a precomputed dataset's entries {key: (B, ...)}."""
    captions: list[str]
    ids: list[int]
    """The clips' dataset indices (the latent cache's keys, the image noise's seeds)."""
    first: int
    """Index of its first clip among the group's clips of the step (the per-sample draws' index)."""
    step_samples: int
    """Clips of the whole step, every data-parallel group and micro-step: the loss is the mean over them."""
    step_tokens: int
    """Tokens of those clips (tokens/s)."""
    cp: int | None = None
    """The context-parallel degree it runs at (parallel.dynamic_cp); None: parallel.cp_size."""
    bucket: str | None = None
    """Its bucket's name ("17x16x24"), with data.buckets."""


class DistributedBatches:
    """Batches of one data-parallel rank: a per-epoch permutation of the dataset (seeded by epoch), strided by
    dp rank; every rank of a cp x tp group (same dp rank) reads the same clips in the same order."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 0,
        position: DataPosition | None = None,
        grad_accum: int = 1,
        tokens: int = 0,
    ):
        if len(dataset) < batch_size * dp_size:
            raise ValueError(
                f"dataset has {len(dataset)} clips; data.batch_size={batch_size} x {dp_size} "
                "data-parallel ranks needs at least that many"
            )
        self.ds, self.bs, self.dp_rank, self.dp, self.seed = dataset, batch_size, dp_rank, dp_size, seed
        self.pos = position or DataPosition()
        self.grad_accum, self.tokens, self._micro = grad_accum, tokens, 0

    def per_step(self) -> int:
        """Clips all data-parallel ranks take together per micro-step."""
        return self.bs * self.dp

    def next(self) -> MicroBatch:
        if self.pos.clips + self.per_step() > len(self.ds):
            self.pos = DataPosition(self.pos.epoch + 1, 0)
        perm = torch.randperm(len(self.ds), generator=generator(self.seed, "data order", self.pos.epoch))
        start = self.pos.clips + self.dp_rank * self.bs
        ids = [int(i) for i in perm[start : start + self.bs]]
        items = [self.ds[i] for i in ids]
        self.pos = DataPosition(self.pos.epoch, self.pos.clips + self.per_step())
        first, self._micro = self._micro * self.bs, (self._micro + 1) % self.grad_accum
        samples = self.per_step() * self.grad_accum
        return MicroBatch(*stack_clips(items), ids, first, samples, samples * self.tokens)


def stack_clips(items: list[tuple]) -> tuple[torch.Tensor | dict[str, torch.Tensor], list[str]]:
    """[(video or precomputed entries, caption)] -> (videos (B, ...) or entries {key: (B, ...)}, captions)."""
    clips = [v for v, _ in items]
    if isinstance(clips[0], dict):  # precomputed entries: each key stacked (B, ...)
        return {k: torch.stack([c[k] for c in clips]) for k in clips[0]}, [c for _, c in items]
    return torch.stack(clips), [c for _, c in items]


SYNTHETIC = {"synthetic": SyntheticShapes, "synthetic_i2v": SyntheticShapesI2V}


def build_dataset(cfg, seed: int):
    d = cfg.data
    if d.dataset == "precomputed":
        from launch.job.precomputed import PrecomputedDataset

        return PrecomputedDataset(d.path)
    if d.dataset in SYNTHETIC:
        return SYNTHETIC[d.dataset](d.num_samples, d.num_frames, d.height, d.width, seed)
    return VideoFolder(d.path, d.num_frames, d.height, d.width, d.fps, random_crop=d.random_crop, seed=seed)
