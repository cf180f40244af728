# Per bucket of data.buckets: the tokens of one clip, the clips of a micro-batch under data.token_budget, the
# context-parallel degree it runs at (parallel.dynamic_cp) and the memory the planner predicts for it. One function,
# `plan_buckets`, answers all of it for the launcher's checks, `cpdit-launch plan` and every rank of the job (the
# same numbers everywhere: it is a pure function of the config and the layout).
#
# Memory of a bucket at degree c: a rank of a sub-group of c ranks holds ceil(n / (cp / c)) of the micro-batch's
# n clips, each split over c ranks, while FSDP2 still shards over dp_shard x cp: exactly the step of the layout
# (world, cp=c, the same tp) with that many clips, whose FSDP group (world / (tp x replicas)) is the same.
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from cpdit.first_stage import latent_frames
from cpdit.models.patch import patch_frame_padding
from launch.config import ConfigError, JobConfig
from launch.job.buckets import Bucket, micro_batch, parse_buckets
from launch.preflight import checked_first_stage, job_model
from parallel.dims import ParallelDims
from parallel.dynamic_cp import cp_degrees, sub_shape
from parallel.memory_model import Workload

GiB = 2**30
HEADROOM = 0.9  # as `cpdit-launch plan --headroom`: the share of a device a step may use


@dataclass
class BucketPlan:
    bucket: Bucket
    tokens: int
    """Tokens of one clip: text + latent patch-frames x patches per frame."""
    patch_frames: int
    """What context parallelism splits (latent frames, in CogVideoX 1.5's pairs)."""
    micro: int
    """Clips per micro-batch of a cp group."""
    cp: int
    """The degree it runs at (parallel.cp_size without dynamic cp)."""
    per_rank_clips: int
    """Clips of the largest sub-group's share of the micro-batch."""
    predicted: int | None = None
    """Bytes per rank the planner predicts (frozen VAE + T5 included); None where it was not asked or cannot."""
    fits: bool | None = None
    """Whether `predicted` with the margin is within the cap (None: not predicted)."""
    pinned: bool = False
    """parallel.cp_per_bucket chose the degree."""


def buckets_of(cfg: JobConfig) -> list[Bucket]:
    return parse_buckets(cfg.data.buckets or [])


def bucket_config(cfg: JobConfig, bucket: Bucket) -> JobConfig:
    """The job as if every clip had the bucket's shape (the per-bucket checks and predictions)."""
    d = replace(cfg.data, num_frames=bucket.frames, height=bucket.height, width=bucket.width)
    d = replace(d, buckets=None, bucket_weights=None, token_budget=0)
    p = replace(cfg.parallel, dynamic_cp=False, cp_per_bucket=None)
    return replace(cfg, data=d, parallel=p)


def device_memory(cfg: JobConfig, local_ranks: int) -> int:
    """parallel.dynamic_cp_memory_gib, else the GPU's memory, else this machine's divided by its processes."""
    if cfg.parallel.dynamic_cp_memory_gib is not None:
        return int(cfg.parallel.dynamic_cp_memory_gib * GiB)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_ranks, 1)


def plan_buckets(
    cfg: JobConfig,
    dims: ParallelDims,
    local_ranks: int = 1,
    predict: bool | None = None,
    cap_bytes: int | None = None,
    margin: float | None = None,
) -> list[BucketPlan]:
    """Every bucket's plan under `dims`. `predict`: ask the planner for each bucket's memory (default: when the
    degrees are chosen by it). `cap_bytes`: what a rank may use (default: HEADROOM of device_memory). Raises
    ConfigError naming the knob for a degree that cannot run."""
    from launch.plan import margin_for

    p = cfg.parallel
    auto = p.dynamic_cp and p.cp_per_bucket is None
    predict = auto if predict is None else predict
    m = _model(cfg)
    family_planned = _planned(m)
    if auto and not family_planned:
        raise ConfigError(
            f"parallel.dynamic_cp=true chooses each bucket's cp degree from the planner's memory prediction, which "
            f"does not model model.preset={cfg.model.preset}; pin the degrees with parallel.cp_per_bucket (one per "
            "bucket)"
        )
    if cap_bytes is None:
        cap_bytes = int(device_memory(cfg, local_ranks) * HEADROOM) if predict else 0
    cap, margin = cap_bytes, margin_for(cfg) if margin is None else margin
    out = []
    for i, bucket in enumerate(buckets_of(cfg)):
        bcfg = bucket_config(cfg, bucket)
        work = clip_work(cfg, dims, m, bucket)
        patch_frames, tokens = work.token_frames, clip_tokens(work, m)
        n = micro_batch(tokens, cfg.data.token_budget) if cfg.data.token_budget else cfg.data.batch_size
        usable = [c for c in cp_degrees(dims) if dims.cp // c <= n and c <= patch_frames]
        if not p.dynamic_cp:
            usable = [dims.cp]
        pinned = p.cp_per_bucket[i] if p.cp_per_bucket is not None else None
        if pinned is not None:
            _check_pin(dims, bucket, i, pinned, n, patch_frames)
            usable = [pinned]
        plan = None
        for c in usable:  # ascending: the smallest degree that fits
            share = math.ceil(n / (dims.cp // c))
            plan = BucketPlan(bucket, tokens, patch_frames, n, c, share, pinned=pinned is not None)
            if predict and family_planned:
                plan.predicted = _predict(bcfg, m, work, dims, c, share)
                plan.fits = plan.predicted * (1 + margin) <= cap
                if plan.fits:
                    break
            else:
                break
        if plan is None:
            raise ConfigError(
                f"data.buckets[{i}]={bucket.name}: {patch_frames} patch-frame(s) in micro-batches of {n} clip(s) "
                f"cannot run under parallel.cp_size={dims.cp} (every rank needs a frame and every sub-group a "
                "clip); raise data.token_budget or lower parallel.cp_size"
            )
        out.append(plan)
    return out


def _model(cfg: JobConfig):
    """The job's DiT config: its preset's, or model.pretrained's."""
    m = job_model(cfg)
    if m is None:
        raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: no readable config.json and weights")
    return m


def clip_work(cfg: JobConfig, dims: ParallelDims, m, bucket: Bucket) -> Workload:
    """One clip of `bucket`'s shape as the model takes it: latent frames (with CogVideoX 1.5's leading copies of
    frame 0), the latent grid and the text length (any family)."""
    _, tf, sf = checked_first_stage(cfg, dims)
    frames = latent_frames(bucket.frames, tf)
    per_patch = getattr(m, "frames_per_patch", 1)
    frames += patch_frame_padding(frames, per_patch)
    return Workload(frames, bucket.height // sf, bucket.width // sf, cfg.train.text_max_length, 1, per_patch)


def clip_tokens(work: Workload, m) -> int:
    """Tokens of one clip: text + patch-frames x patches per frame."""
    return work.text_len + work.token_frames * (work.height // m.patch_size) * (work.width // m.patch_size)


def _planned(m) -> bool:
    from cpdit.models.registry import family_of

    return family_of(m).planned


def _check_pin(dims: ParallelDims, bucket: Bucket, i: int, c: int, n: int, patch_frames: int) -> None:
    key = f"parallel.cp_per_bucket[{i}]={c} (data.buckets[{i}]={bucket.name})"
    if c not in cp_degrees(dims):
        raise ConfigError(f"{key}: not a degree that splits cp_size={dims.cp}; use one of {cp_degrees(dims)}")
    if dims.cp // c > n:
        raise ConfigError(
            f"{key}: {dims.cp // c} sub-groups but micro-batches of {n} clip(s); every sub-group needs a clip: use a "
            f"degree of at least {dims.cp // n} or raise data.token_budget"
        )
    if c > patch_frames:
        raise ConfigError(
            f"{key}: {patch_frames} patch-frame(s) cannot give each of {c} ranks one; use <= {patch_frames}"
        )


def _predict(bcfg: JobConfig, m, work, dims: ParallelDims, c: int, clips: int) -> int:
    from launch.plan import frozen_bytes, step_memory

    ring, uly = sub_shape(dims, c)
    sub = ParallelDims(dims.world_size, c, dims.tp, uly, dims.dp_replicate)
    ac = "full" if bcfg.model.gradient_checkpointing else "none"
    foreach = bcfg.dist.backend == "nccl" or (bcfg.dist.backend == "auto" and _cuda())
    mem = step_memory(bcfg, m, replace(work, batch=clips), sub, ac, foreach)
    return mem.total + frozen_bytes(bcfg)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def budget_for(
    cfg: JobConfig, dims: ParallelDims, cap_bytes: int, margin: float | None = None
) -> tuple[int, list[int]]:
    """The largest data.token_budget under which every bucket's micro-batch fits `cap_bytes` (with the margin) at
    the full cp_size, and each bucket's clips per micro-batch under it: memory grows linearly with the clips of a
    micro-batch (two predictions per bucket, 1 and 2 clips, fix the line). (0, ...) when one clip of some bucket
    does not fit."""
    from launch.plan import margin_for

    margin = margin_for(cfg) if margin is None else margin
    m = _model(cfg)
    if not _planned(m):
        raise ConfigError(f"cpdit-launch plan does not model model.preset={cfg.model.preset}")
    limit = cap_bytes / (1 + margin)
    fitting = []  # (tokens of a clip, most clips that fit)
    for bucket in buckets_of(cfg):
        bcfg = bucket_config(cfg, bucket)
        work = clip_work(cfg, dims, m, bucket)
        tokens = clip_tokens(work, m)
        one, two = (_predict(bcfg, m, work, dims, dims.cp, k) for k in (1, 2))
        fitting.append((tokens, 0 if one > limit else 1 + int((limit - one) // max(two - one, 1))))
    budget = min(n * tokens for tokens, n in fitting)
    return budget, [budget // tokens for tokens, _ in fitting]


def largest_bucket_config(cfg: JobConfig, world: int) -> JobConfig:
    """The job as if every clip were of the bucket whose micro-batch holds the most tokens (at its micro-batch):
    the one the layout must fit."""
    dims = ParallelDims.from_config(cfg.parallel, world)  # the micro-batches do not depend on the layout
    plans = plan_buckets(replace(cfg, parallel=replace(cfg.parallel, dynamic_cp=False, cp_per_bucket=None)), dims)
    big = max(plans, key=lambda p: p.micro * p.tokens)
    bcfg = bucket_config(cfg, big.bucket)
    return replace(bcfg, data=replace(bcfg.data, batch_size=big.micro))


def bucket_report(cfg: JobConfig, dims: ParallelDims, cap_bytes: int, margin: float) -> str:
    """`cpdit-launch plan`'s bucket table: each bucket's micro-batch under data.token_budget, the cp degree it runs
    at and the memory predicted for it, then the budget to use."""
    plans = plan_buckets(cfg, dims, predict=True, cap_bytes=cap_bytes, margin=margin)
    dyn = cfg.parallel.dynamic_cp
    rows = [
        f"buckets under {dims.describe()}, data.token_budget={cfg.data.token_budget}"
        + (" (0: data.batch_size clips each)" if not cfg.data.token_budget else "")
        + (", parallel.dynamic_cp: the smallest degree that fits" if dyn else f", every bucket at cp={dims.cp}")
        + ":",
        "| bucket | tokens/clip | micro-batch | cp | clips per rank | predicted GiB/rank | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        pred = f"{p.predicted / GiB:.3f}" if p.predicted is not None else "not modelled"
        fits = {True: "yes", False: "no", None: "?"}[p.fits]
        rows.append(
            f"| {p.bucket.name} | {p.tokens} | {p.micro} | {p.cp}{' (pinned)' if p.pinned else ''} | "
            f"{p.per_rank_clips} | {pred} | {fits} |"
        )
    budget, counts = budget_for(cfg, dims, cap_bytes, margin)
    if budget:
        each = ", ".join(f"{p.bucket.name}: {n}" for p, n in zip(plans, counts, strict=True))
        rows.append(
            f"\nrecommended data.token_budget={budget}: the largest under which every bucket's micro-batch fits at "
            f"cp={dims.cp} with the {margin:.1%} margin (clips per micro-batch: {each})"
        )
    else:
        rows.append(f"\nno token budget fits: one clip of some bucket exceeds the memory at cp={dims.cp}")
    return "\n".join(rows)
