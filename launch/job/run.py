# Everything one training run builds before its first step, in the order the ranks must build it: the modules
# (parallelized), the optimizer, the state (resumed from a checkpoint when there is one), the run log, the data,
# the latent cache and the hang watchdog.
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cpdit.diffusion import Schedule
from cpdit.first_stage import FirstStage
from cpdit.models.cogvideox.config import CogVideoXConfig
from cpdit.models.registry import family_of
from launch.bucket_plan import BucketPlan, buckets_of, clip_tokens, clip_work, plan_buckets
from launch.config import JobConfig, to_yaml
from launch.env import DistEnv
from launch.job import checkpoint
from launch.job.bucketed import build_bucketed
from launch.job.buckets import Bucket, BucketedBatches
from launch.job.build import AMP_DTYPES, Trainable, architecture, build
from launch.job.data import DistributedBatches, build_dataset
from launch.job.ema import new_ema
from launch.job.faults import Faults
from launch.job.latent_cache import LatentCache
from launch.job.latent_cache import fingerprint as latent_fingerprint
from launch.job.loss_scale import DynamicLossScale
from launch.job.metrics import RunLog
from launch.job.preemption import StopRequest, clear_marker
from launch.job.state import TrainState
from launch.job.watchdog import HangWatchdog
from parallel.comm import agree
from parallel.dims import ParallelDims, ParallelMesh
from parallel.dynamic_cp import enable_dynamic_cp
from parallel.fsdp import adamw_foreach
from parallel.parallelize import Parallelized
from parallel.progress import PROGRESS


@dataclass(kw_only=True)
class Run:
    """The state of one training run that every part of the step reads: built once by `start_run`, by keyword."""

    cfg: JobConfig
    env: DistEnv
    dims: ParallelDims
    mesh: ParallelMesh
    device: torch.device
    stop: StopRequest
    run_dir: Path
    faults: Faults
    modules: Trainable
    parallel: Parallelized
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor] | None
    state: TrainState
    arch: dict
    log: RunLog
    dataset: Dataset
    batches: DistributedBatches | BucketedBatches
    bucket_plans: list[BucketPlan] | None
    """data.buckets: each bucket's tokens, micro-batch and cp degree (launch/bucket_plan.py); None without."""
    schedule: Schedule
    first_stage: FirstStage
    cache: LatentCache | None
    autocast: torch.autocast
    frame_causal: bool
    image_conditioned: bool
    """Image-to-video: [noisy | image] latents into the model (launch/job/image_cond.py)."""
    watchdog: HangWatchdog | None

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def elastic_attempt() -> int:
    """Collective. How many times torchrun restarted this job's workers: the largest TORCHELASTIC_RESTART_COUNT of
    any rank (agents on other nodes restart their workers without counting it when a peer node fails)."""
    return agree([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))], "max", "elastic attempt")[0]


def frozen_bytes(modules: Trainable, par: Parallelized) -> dict[str, int]:
    """Bytes of the frozen modules in this rank's memory during training: the VAE and a frozen T5 (both 0 when
    training from precomputed data, which leaves them out)."""
    vae, t5 = getattr(par.local_first_stage, "vae", None), modules.frozen_text

    def size(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0

    return {"first_stage": size(vae), "frozen_text": size(t5)}


def open_data(cfg: JobConfig, env: DistEnv, dims: ParallelDims, state: TrainState, modules: Trainable, par):
    """Collective with parallel.dynamic_cp (the sub-groups' meshes). The dataset, the rank's batches from the
    checkpointed position, and with data.buckets each bucket's plan."""
    seed, dp_rank = cfg.train.seed, dims.dp_rank(env.rank)
    if not cfg.data.buckets:
        dataset = build_dataset(cfg, seed)
        m = modules.dit.config
        tokens = clip_tokens(clip_work(cfg, dims, m, Bucket(cfg.data.num_frames, cfg.data.height, cfg.data.width)), m)
        batches = DistributedBatches(
            dataset, cfg.data.batch_size, dp_rank, dims.dp, seed, state.position, cfg.train.grad_accum, tokens
        )
        return dataset, batches, None
    plans = plan_buckets(cfg, dims, env.local_world_size)
    dataset = build_bucketed(cfg, buckets_of(cfg), seed)
    batches = BucketedBatches(dataset, plans, seed, dp_rank, dims.dp, cfg.train.grad_accum, state.position)
    if cfg.parallel.dynamic_cp:
        enable_dynamic_cp(par.model, dims, [p.cp for p in plans], timedelta(seconds=cfg.dist.timeout_s))
    return dataset, batches, plans


def plan_row(plan: BucketPlan, clips: int) -> dict:
    """A bucket's line of the `buckets` event of metrics.jsonl."""
    row = {"bucket": plan.bucket.name, "clips": clips, "tokens": plan.tokens, "micro_batch": plan.micro, "cp": plan.cp}
    if plan.predicted is not None:
        row["predicted_mib"] = round(plan.predicted / 2**20, 1)
    return row


def start_run(cfg: JobConfig, env: DistEnv, dims: ParallelDims, mesh, device: torch.device, stop: StopRequest) -> Run:
    """Collective. Build, resume and open the run; the watchdog is started last."""
    rank = env.rank
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    attempt = elastic_attempt()
    faults = Faults(cfg.debug, rank, attempt)
    PROGRESS.enter("build")
    modules, par = build(cfg, dims, mesh, device)
    params = [q for q in modules.parameters() if q.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, foreach=adamw_foreach(params)
    )
    ema = new_ema(modules.dit) if cfg.train.ema_decay > 0 else None
    fp16 = cfg.train.mixed_precision == "fp16"
    state = TrainState(loss_scale=DynamicLossScale(cfg.train.loss_scale, cfg.train.loss_scale_window) if fp16 else None)
    arch = architecture(cfg, modules.dit.config)
    PROGRESS.enter("resume")
    resume = checkpoint.select_resume(run_dir / "checkpoints", cfg.checkpoint.resume, arch)
    if resume is not None:
        state.load_meta(checkpoint.load(resume, modules, optimizer, ema))
        if cfg.debug.dump_resumed_state:
            checkpoint.dump_full_state(run_dir / "resumed_state.safetensors", modules, optimizer, ema)
    log = RunLog(
        run_dir,
        cfg.train.steps,
        state.step,
        cfg.logging.wandb,
        cfg.logging.wandb_project,
        to_yaml(cfg),
        enabled=rank == 0,
    )
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log.event(
            event="start",
            launcher=env.launcher,
            nodes=env.num_nodes,
            layout=dims.describe(),
            step=state.step,
            frozen_bytes=frozen_bytes(modules, par),
        )
        if attempt:
            log.event(event="restart", attempt=attempt, step=state.step)
        if resume is not None:
            log.event(event="resume", from_checkpoint=str(resume), step=state.step, layout=dims.describe())
    if env.local_rank == 0:
        clear_marker(run_dir)
    dataset, batches, plans = open_data(cfg, env, dims, state, modules, par)
    if rank == 0 and plans is not None:
        clips = [sum(b == i for b in dataset.bucket_of) for i in range(len(plans))]
        log.event(
            event="buckets",
            skipped=dataset.skipped,
            buckets=[plan_row(p, n) for p, n in zip(plans, clips, strict=True)],
        )
    cache = None
    mcfg = modules.dit.config
    image_conditioned = isinstance(mcfg, CogVideoXConfig) and mcfg.image_conditioned
    if cfg.data.latent_cache_dir:
        cache = LatentCache(
            cfg.data.latent_cache_dir,
            latent_fingerprint(cfg, image_conditioned),
            par.is_writer(rank),
            par.first_stage_group,
            image=image_conditioned,
        )
    amp = AMP_DTYPES.get(cfg.train.mixed_precision)
    stage = par.first_stage
    d = cfg.dist
    watchdog = None
    if d.watchdog:
        watchdog = HangWatchdog(
            run_dir / "hang", rank, env.world_size, d.watchdog_factor, d.watchdog_min_s, d.watchdog_warmup_s
        ).start()
    return Run(
        cfg=cfg,
        env=env,
        dims=dims,
        mesh=mesh,
        device=device,
        stop=stop,
        run_dir=run_dir,
        faults=faults,
        modules=modules,
        parallel=par,
        params=params,
        optimizer=optimizer,
        ema=ema,
        state=state,
        arch=arch,
        log=log,
        dataset=dataset,
        batches=batches,
        schedule=Schedule.zero_snr(cfg.train.num_idx, cfg.train.shift_scale),
        first_stage=stage,
        cache=cache,
        autocast=torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None),
        frame_causal=family_of(mcfg).frame_causal(mcfg),
        image_conditioned=image_conditioned,
        bucket_plans=plans,
        watchdog=watchdog,
    )
