# `cpdit-launch precompute [config] [overrides]`: encode a dataset once, before training, into
# precompute.output_dir (the format: launch/job/precomputed.py). Clips go through the first stage under context
# parallelism (the VAE split over the cp group, as in training) and are spread over the data-parallel replicas a
# shard at a time; one rank per replica writes. Captions go through a frozen T5 (under the training's autocast, so
# the embeddings are the ones training would compute). An image-to-video model's entries keep its noised first
# frame's posterior (train.image_noise=clip). Killed and rerun with the same config, it redoes only the shards that
# are not on disk and valid; rank 0 shows the progress of every replica.
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cpdit.first_stage import latent_frames
from launch.config import JobConfig
from launch.env import DistEnv
from launch.job.build import AMP_DTYPES, build_first_stage, build_frozen_text, model_config, pretrained_config
from launch.job.data import build_dataset
from launch.job.image_cond import noised_image_moments
from launch.job.precomputed import Index, PrecomputedError, read_index, shard_ok, source_of, write_index, write_shard
from parallel.comm import agree
from parallel.dims import ParallelDims
from parallel.parallelize import parallelize_first_stage
from parallel.progress import PROGRESS


def job_model(cfg: JobConfig):
    """The job's DiT config: whether it is an image-to-video model (its entries keep the noised first frame's
    posterior) and the text width."""
    return pretrained_config(cfg.model.pretrained) if cfg.model.pretrained else model_config(cfg)


TEXT_DTYPES = {1: (torch.float32, "F32"), 2: (torch.bfloat16, "BF16"), 3: (torch.float16, "F16")}


def planned_index(cfg: JobConfig, clips: int, stage, image: bool, width: int | None, text_dtype: str) -> Index:
    """The directory's plan: per clip the posterior (C, T, h, w), the noised image's (C, 1, h, w), the text's
    embedding (L, D) in the dtype the training step sees it and its token mask (L,)."""
    d = cfg.data
    latent = [latent_frames(d.num_frames, stage.temporal_factor), d.height // stage.spatial_factor]
    latent = [stage.latent_channels, *latent, d.width // stage.spatial_factor]
    keys = {"mean": latent, "logvar": latent}
    if image:
        keys.update(image_mean=[latent[0], 1, *latent[2:]], image_logvar=[latent[0], 1, *latent[2:]])
    dtypes = {k: "F32" for k in keys}
    if width is not None:
        keys.update(text=[cfg.train.text_max_length, width], text_mask=[cfg.train.text_max_length])
        dtypes.update(text=text_dtype, text_mask="BOOL")
    return Index.plan(source_of(cfg, image), clips, cfg.precompute.shard_size, keys, dtypes)


def open_directory(root: Path, index: Index) -> None:
    """Rank 0: a new directory gets the plan; an existing one must hold this same plan (a rerun finishes it)."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / "index.json").exists():
        old = read_index(root)
        if old.fingerprint != index.fingerprint:
            raise PrecomputedError(
                f"precompute.output_dir={str(root)!r} holds the precompute of another config or dataset (fingerprint "
                f"{old.fingerprint}, this one {index.fingerprint}); choose another precompute.output_dir or delete it"
            )
        index.complete, index.seconds = old.complete, old.seconds
        if old.complete:
            return
    write_index(root, index)


def precompute(cfg: JobConfig, env: DistEnv) -> int:
    from launch.distributed import distributed

    dims = ParallelDims.from_config(cfg.parallel, env.world_size)
    root, rank = Path(cfg.precompute.output_dir), env.rank
    with distributed(env, cfg.dist.backend, cfg.dist.timeout_s) as device:
        mesh = dims.build_mesh(device.type, timedelta(seconds=cfg.dist.timeout_s))
        writer = dims.is_writer(rank)
        local = build_first_stage(cfg, device)
        stage = parallelize_first_stage(local, dims, mesh, cfg.first_stage.cp_size)
        mcfg = job_model(cfg)
        text = build_frozen_text(cfg, device, mcfg.text_embed_dim) if writer else None
        code = 0
        if text is not None:  # the dtype the step's autocast gives the embeddings, kept as they are
            with _autocast(cfg, device):
                dtype = text(["a"]).dtype
            code = next(c for c, (t, _) in TEXT_DTYPES.items() if t == dtype)
        code = agree([code], "max", "text dtype")[0]
        dataset = build_dataset(cfg, cfg.train.seed)
        width = mcfg.text_embed_dim if cfg.text.encoder == "t5" else None
        image = bool(getattr(mcfg, "image_conditioned", False))
        index = planned_index(cfg, len(dataset), local, image, width, TEXT_DTYPES.get(code, (None, ""))[1])
        status = 0
        if rank == 0:
            try:
                open_directory(root, index)
            except PrecomputedError as err:
                print(f"cpdit precompute: error: {err}", file=sys.stderr, flush=True)
                status = 1
        if agree([status], "max", "precompute directory")[0]:
            return 2
        done = agree([shard_ok(root, index, k) for k in range(index.num_shards)], "min", "finished shards")
        todo = [k for k in range(index.num_shards) if not done[k]]
        mine = todo[dims.dp_rank(rank) :: dims.dp]
        rounds = -(-len(todo) // dims.dp)
        already = sum(len(index.shard_clips(k)) for k in range(index.num_shards) if done[k])
        bar = _progress(index.clips, already, enabled=rank == 0)
        started = time.perf_counter()
        for r in range(rounds):  # every rank in every round: the progress count is a collective
            PROGRESS.enter("precompute", r)
            if cfg.debug.step_sleep_s > 0:  # slow shards, for the tests that kill a precompute midway
                time.sleep(cfg.debug.step_sleep_s)
            n = 0
            if r < len(mine):
                n = _encode_shard(cfg, root, index, mine[r], dataset, stage, local, text, device, writer)
            bar.update(agree([n if writer else 0], "sum", "precompute progress")[0])
        dist.barrier()
        bar.close()
        seconds = time.perf_counter() - started
        if rank == 0:
            index.complete, index.seconds = True, round((index.seconds or 0) + seconds, 3)
            write_index(root, index)
            rate = sum(len(index.shard_clips(k)) for k in todo) / max(seconds, 1e-9)
            print(
                f"cpdit precompute: {index.clips} clips in {index.num_shards} shards under {root} ({len(todo)} shards "
                f"written, {seconds:.1f} s, {rate:.2f} clips/s); train with data.dataset=precomputed data.path={root}",
                flush=True,
            )
        del mesh, stage, local
    return 0


@torch.no_grad()
def _encode_shard(cfg, root, index, k, dataset, stage, local, text, device, writer) -> int:
    """Collective over the first stage's group: encode shard k's clips in batches of data.batch_size; the writer
    adds the image posteriors and text embeddings and writes the shard. Returns its clip count."""
    ids = list(index.shard_clips(k))
    parts: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    for b in range(0, len(ids), cfg.data.batch_size):
        batch = ids[b : b + cfg.data.batch_size]
        items = [dataset[i] for i in batch]
        video = torch.stack([v for v, _ in items]).to(device)  # (B, F, 3, H, W)
        captions += [c for _, c in items]
        mean, logvar = stage.moments(video)  # each (B, C, T, h, w); collective over the VAE's cp group
        if not writer:
            continue
        out = {"mean": mean, "logvar": logvar}
        if "image_mean" in index.keys:
            out["image_mean"], out["image_logvar"] = noised_image_moments(local, cfg.train.seed, video, batch)
        if text is not None:
            with _autocast(cfg, device):
                out["text"] = text([c for _, c in items])  # (B, L, D) as the training step computes it
            out["text_mask"] = text.token_mask([c for _, c in items])
        for key, t in out.items():
            parts.setdefault(key, []).append(t.float().cpu() if key in ("mean", "logvar") else t.cpu())
    if writer:
        tensors = {key: torch.cat(ts) for key, ts in parts.items()}
        write_shard(root, index, k, tensors, captions)
    return len(ids)


def _autocast(cfg, device: torch.device) -> torch.autocast:
    """The training step's autocast (train.mixed_precision), under which it embeds captions."""
    amp = AMP_DTYPES.get(cfg.train.mixed_precision)
    return torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="clip",
        desc="precompute",
        disable=not enabled,
        file=sys.stderr,
        mininterval=2,
    )
