# The precomputed dataset: what `cpdit-launch precompute` writes (launch/job/precompute.py) and
# data.dataset=precomputed trains from. A directory of safetensors shards of precompute.shard_size clips each, plus
# index.json. A shard holds, for the clips of its range, the VAE posterior (mean, logvar, unscaled: the posterior
# sample is still drawn each step), an image-to-video model's noised first frame's posterior, and with a frozen T5
# the caption's embedding and token mask; the captions are in its metadata. Only index.json and the shards it names
# are ever opened, each a regular file inside the directory (no symlink), checked against the index (format, keys,
# shapes, fingerprint) before any worker starts; nothing in it is unpickled.
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cpdit.safe_paths import OutsideDirectory, inside
from launch.job.latent_cache import first_stage_identity

FORMAT, VERSION, INDEX = "cpdit-precomputed", 1, "index.json"
REMEDY = "rerun `cpdit-launch precompute` with the config that wrote it (finished shards are kept)"


class PrecomputedError(ValueError):
    """A precomputed directory that cannot be trained from: the message names the file, what is wrong and the fix."""


def source_of(cfg, image: bool) -> dict:
    """What a precomputed directory's entries depend on: the clips (dataset, shape, seed), the first stage, the text
    encoder whose embeddings it keeps (a frozen T5; none for the trainable hashed encoder) and the image recipe."""
    d = cfg.data
    return {
        "dataset": d.dataset,
        "path": str(Path(d.path).resolve()) if d.path else None,
        "num_samples": d.num_samples if d.dataset != "folder" else None,
        "num_frames": d.num_frames,
        "height": d.height,
        "width": d.width,
        "fps": d.fps,
        "random_crop": d.random_crop,
        "seed": cfg.train.seed,
        "first_stage": first_stage_identity(cfg),
        "text": [cfg.text.encoder, cfg.text.path, cfg.train.text_max_length] if cfg.text.encoder == "t5" else None,
        "image": ["first frame", "clip noise"] if image else None,
    }


@dataclass
class Index:
    """index.json: the plan of the directory (written before the first shard) and, once every shard is written,
    `complete` with the time it took."""

    fingerprint: str
    clips: int
    shard_size: int
    keys: dict[str, list[int]]  # each tensor's shape per clip
    dtypes: dict[str, str]
    source: dict
    complete: bool = False
    seconds: float | None = None
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def plan(cls, source: dict, clips: int, shard_size: int, keys: dict, dtypes: dict) -> Index:
        digest = hashlib.sha256(json.dumps([source, clips, shard_size], sort_keys=True).encode()).hexdigest()[:16]
        return cls(digest, clips, shard_size, keys, dtypes, source)

    @property
    def num_shards(self) -> int:
        return -(-self.clips // self.shard_size)

    def shard_name(self, k: int) -> str:
        return f"shard-{k:06d}.safetensors"

    def shard_clips(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.clips))


def write_index(root: Path, index: Index) -> None:
    tmp = root / f"{INDEX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(asdict(index), indent=1))
    tmp.replace(root / INDEX)


def read_index(root: str | Path) -> Index:
    root = Path(root)
    if not root.is_dir():
        raise PrecomputedError(f"{str(root)!r} is not a directory; make one with `cpdit-launch precompute`")
    path = root / INDEX
    if path.is_symlink() or not path.is_file():
        raise PrecomputedError(
            f"{str(root)!r} has no {INDEX} (a regular file), so it is not a directory written by "
            "`cpdit-launch precompute`; set precompute.output_dir to it and run the precompute"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise PrecomputedError(f"{path} is not a cpdit precompute index (format {raw.get('format')!r})")
        if raw.get("version") != VERSION:
            raise PrecomputedError(
                f"{path} has version {raw.get('version')!r}; this cpdit reads version {VERSION}: precompute again"
            )
        index = Index(**raw)
        assert isinstance(index.clips, int) and isinstance(index.shard_size, int) and index.shard_size > 0
        assert isinstance(index.keys, dict) and isinstance(index.source, dict)
    except PrecomputedError:
        raise
    except (ValueError, TypeError, AttributeError, AssertionError) as err:
        raise PrecomputedError(f"{path} is not a valid precompute index ({type(err).__name__}: {err})") from None
    return index


def write_shard(root: Path, index: Index, k: int, tensors: dict[str, torch.Tensor], captions: list[str]) -> None:
    """Shard k: each tensor (n, ...) over its clips; written to a temporary file and renamed (never half a shard)."""
    path = root / index.shard_name(k)
    meta = {"format": FORMAT, "fingerprint": index.fingerprint, "first_clip": str(k * index.shard_size)}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(
        {n: t.contiguous().cpu() for n, t in tensors.items()}, str(tmp), {**meta, "captions": json.dumps(captions)}
    )
    tmp.replace(path)


def check_shard(root: Path, index: Index, k: int) -> None:
    """Raise PrecomputedError unless shard k is the regular file of the index's plan: this directory's fingerprint,
    every key with its shape and dtype, a caption per clip."""
    name, n = index.shard_name(k), len(index.shard_clips(k))
    try:
        path = inside(root, name)
    except OutsideDirectory as err:
        raise PrecomputedError(f"{err}; {REMEDY}") from None
    if not path.is_file():
        raise PrecomputedError(f"{path} is missing: the precompute did not finish; {REMEDY}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shapes = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}
        captions = json.loads(meta.get("captions", "null"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise PrecomputedError(f"{path} is not a readable safetensors shard ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT or meta.get("fingerprint") != index.fingerprint:
        raise PrecomputedError(
            f"{path} was not written by the precompute that {root / INDEX} describes (fingerprint "
            f"{meta.get('fingerprint')!r}, expected {index.fingerprint!r}); remove it and {REMEDY}"
        )
    want = {key: ([n, *shape], index.dtypes[key]) for key, shape in index.keys.items()}
    got = {key: (list(shape), dtype) for key, (shape, dtype) in shapes.items()}
    if got != want or not isinstance(captions, list) or len(captions) != n:
        raise PrecomputedError(f"{path} holds {got}, not the index's {want} and {n} captions; remove it and {REMEDY}")


def shard_ok(root: Path, index: Index, k: int) -> bool:
    try:
        check_shard(root, index, k)
    except PrecomputedError:
        return False
    return True


class PrecomputedDataset(torch.utils.data.Dataset):
    """Clip i of a precomputed directory: ({key: tensor} of its entries, caption), read from its shard by slice."""

    skipped = 0

    def __init__(self, root: str | Path):
        self.root, self.index = Path(root), read_index(root)
        self._captions: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return self.index.clips

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], str]:
        k, j = divmod(i, self.index.shard_size)
        path = inside(self.root, self.index.shard_name(k))
        with safe_open(str(path), "pt") as f:
            entry = {key: f.get_slice(key)[j] for key in self.index.keys}
            if k not in self._captions:
                self._captions[k] = json.loads(f.metadata()["captions"])
        return entry, self._captions[k][j]


def check_for_training(cfg, image: bool, dp: int) -> Index:
    """data.dataset=precomputed: the directory at data.path, complete and every shard valid, made for this job (its
    clip shape, first stage, frozen T5 and, for an image-to-video model, the noised first frame). The index."""
    d, root = cfg.data, Path(cfg.data.path)
    index = read_index(root)
    for k in range(index.num_shards):
        check_shard(root, index, k)
    src, where = index.source, f"data.path={d.path!r}"
    for knob, key in (("num_frames", "num_frames"), ("height", "height"), ("width", "width")):
        if getattr(d, knob) != src[key]:
            raise PrecomputedError(
                f"data.{knob}={getattr(d, knob)} but {where} holds clips of {key} {src[key]}; set data.{knob}="
                f"{src[key]}, or precompute again with data.{knob}={getattr(d, knob)}"
            )
    if first_stage_identity(cfg) != src["first_stage"]:
        raise PrecomputedError(
            f"{where} was encoded by another first stage ({src['first_stage']}: kind, ckpt_path, preset, seed of a "
            f"random VAE, batching) than this job's ({first_stage_identity(cfg)}), which decodes its samples; set "
            "first_stage.* and train.seed as they were, or precompute again"
        )
    text = [cfg.text.encoder, cfg.text.path, cfg.train.text_max_length]
    if cfg.text.encoder == "t5" and src["text"] != text:
        held = "no text embeddings" if src["text"] is None else f"the embeddings of {src['text']}"
        raise PrecomputedError(
            f"text.encoder=t5 with (encoder, path, max length) {text}, but {where} holds {held}; precompute again "
            "with this text config"
        )
    if image and src["image"] is None:
        raise PrecomputedError(
            f"the model is image-to-video, but {where} was precomputed for a text-to-video model (no posterior of the "
            "noised first frame); precompute again with this model config and train.image_noise=clip"
        )
    if image and cfg.train.image_noise != "clip":
        raise PrecomputedError(
            f"train.image_noise={cfg.train.image_noise!r} noises the first frame anew each step, but {where} holds "
            "each clip's first frame noised once: set train.image_noise=clip"
        )
    if index.clips < d.batch_size * dp:
        raise PrecomputedError(
            f"{where} holds {index.clips} clips, fewer than data.batch_size={d.batch_size} x {dp} data-parallel "
            "ranks; lower data.batch_size"
        )
    return index


def source_dataset(cfg) -> str:
    """The dataset the clips came from (data.dataset, or the precomputed directory's)."""
    return read_index(cfg.data.path).source["dataset"] if cfg.data.dataset == "precomputed" else cfg.data.dataset
