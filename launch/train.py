# The training job behind `cpdit-launch train`: CogVideoX's v-prediction diffusion objective on a parallelized
# CogVideoXDiT (dp x cp x tp, FSDP2), AdamW with warm-up + cosine, global-norm clipping, accumulation, EMA, NaN guard,
# DCP checkpoints with exact resume (also under another layout), run directory with metrics, loss curve,
# wandb (offline) files, sample videos and a safetensors/diffusers export.
from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cpdit.diffusion import Schedule, add_noise, per_frame_timesteps, sample_timesteps, v_loss_terms
from cpdit.models.registry import family_of
from launch import checkpoint
from launch.build import architecture, build, new_ema
from launch.config import JobConfig, to_yaml
from launch.data import DataPosition, DistributedBatches, build_dataset
from launch.distributed import distributed
from launch.env import DistEnv
from launch.faults import Faults
from launch.latent_cache import LatentCache
from launch.latent_cache import fingerprint as latent_fingerprint
from launch.metrics import RunLog, plot_loss
from launch.preemption import EXIT_PREEMPTED, StopRequest, clear_marker, under_torchelastic, write_marker
from launch.watchdog import HangWatchdog
from parallel.dims import ParallelDims
from parallel.fsdp import reduce_gradients
from parallel.loss_scale import DynamicLossScale
from parallel.progress import PROGRESS, in_collective
from parallel.train_utils import clip_grad_norm, ema_update


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float, start_ratio: float = 0.0) -> float:
    """SAT's LambdaWarmUpCosineScheduler with lr_max 1, lr_start `start_ratio`, lr_min `min_ratio` and
    max_decay_steps `total`: linear from start_ratio at step 0 towards 1 over `warmup` steps, then cosine down to
    min_ratio at step `total`."""
    if step < warmup:
        return (1.0 - start_ratio) / warmup * step + start_ratio
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * t))


FIRST_STAGE_STREAM = 1 << 20  # draw_seed indices at and above this seed the first stage's posterior samples


def draw_seed(seed: int, dp_rank: int, step: int, index: int) -> int:
    """The seed of a random draw of one optimizer step: identical on the cp x tp ranks of one replica, distinct
    across data-parallel ranks, steps and `index` (a sample of the step's accumulated batch, or a stream)."""
    return (((seed * 1_000_003 + dp_rank) * 1_000_033 + step) * 2_097_169 + index) % 2**63


def diffusion_draws(
    shape: torch.Size, num_idx: int, train, dp_rank: int, dp: int, step: int, first: int, frame_causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timestep indices (B,) or per frame (B, T), noise (B, ...) and the caption keep mask (B,) of a micro-batch.
    Sample j draws from its own generator seeded by its index `first + j` in the step's accumulated batch, so
    k micro-steps of batch b draw exactly what one step of batch k*b draws (accumulation changes nothing)."""
    idx, noise, keep = [], [], []
    for j in range(shape[0]):
        g = torch.Generator().manual_seed(draw_seed(train.seed, dp_rank, step, first + j))
        if frame_causal:  # a noise level per frame
            idx.append(per_frame_timesteps(1, shape[1], num_idx, dp_rank, dp, g)[0])
        else:
            idx.append(sample_timesteps(1, num_idx, dp_rank, dp, g)[0])
        noise.append(torch.randn(shape[1:], generator=g))
        keep.append(torch.rand((), generator=g) >= train.ucg_rate)  # classifier-free dropout of the caption
    return torch.stack(idx), torch.stack(noise), torch.stack(keep)


def elastic_attempt(device: torch.device) -> int:
    """Collective. How many times torchrun restarted this job's workers: the largest TORCHELASTIC_RESTART_COUNT of
    any rank (agents on other nodes restart their workers without counting it when a peer node fails)."""
    attempt = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))], device=device)
    with in_collective("all_reduce(elastic attempt)"):
        dist.all_reduce(attempt, op=dist.ReduceOp.MAX)
    return int(attempt.item())


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: JobConfig, env: DistEnv) -> int:
    p = cfg.parallel
    dims = ParallelDims(env.world_size, p.cp_size, p.model_parallel_size, p.ulysses_size, p.dp_replicate)
    stop = StopRequest(env.rank).install()  # before anything slow: a signal during start-up is honoured too
    try:
        with distributed(env, cfg.dist.backend, cfg.dist.timeout_s) as device:
            torch.manual_seed(cfg.train.seed)
            mesh = dims.build_mesh(device.type)
            result = _train(cfg, env, dims, mesh, device, stop)
            del mesh
    finally:
        if stop.signum is None:  # after a preemption the handlers stay: late signals must not kill the exit
            stop.restore()
    return result


def _train(cfg: JobConfig, env: DistEnv, dims: ParallelDims, mesh, device: torch.device, stop: StopRequest) -> int:
    rank, dp_rank = env.rank, dims.dp_rank(env.rank)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    ckpt_root = run_dir / "checkpoints"
    attempt = elastic_attempt(device)
    faults = Faults(cfg.debug, rank, attempt)
    PROGRESS.enter("build")
    modules = build(cfg, dims, mesh, device)
    params = [q for q in modules.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    ema = new_ema(modules.dit) if cfg.train.ema_decay > 0 else None
    fp16 = cfg.train.mixed_precision == "fp16"
    scaler = DynamicLossScale(cfg.train.loss_scale, cfg.train.loss_scale_window) if fp16 else None
    start, position, counters = 0, DataPosition(), {"bad_steps_total": 0}
    arch = architecture(cfg, modules.dit.config)
    PROGRESS.enter("resume")
    resume = checkpoint.select_resume(ckpt_root, cfg.checkpoint.resume, arch)
    if resume is not None:
        meta = checkpoint.load(resume, modules, optimizer, ema)
        start, position = meta["step"], DataPosition.from_meta(meta)
        counters["bad_steps_total"] = meta.get("bad_steps_total", 0)
        if scaler is not None and "loss_scale" in meta:
            scaler.load_state_dict(meta["loss_scale"])
        if cfg.debug.dump_resumed_state:
            checkpoint.dump_full_state(run_dir / "resumed_state.safetensors", modules, optimizer, ema)
    log = RunLog(
        run_dir, cfg.train.steps, start, cfg.logging.wandb, cfg.logging.wandb_project, to_yaml(cfg), enabled=rank == 0
    )
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log.event(event="start", launcher=env.launcher, nodes=env.num_nodes, layout=dims.describe(), step=start)
        if attempt:
            log.event(event="restart", attempt=attempt, step=start)
        if resume is not None:
            log.event(event="resume", from_checkpoint=str(resume), step=start, layout=dims.describe())
    if env.local_rank == 0:
        clear_marker(run_dir)
    dataset = build_dataset(cfg, cfg.train.seed)
    batches = DistributedBatches(dataset, cfg.data.batch_size, dp_rank, dims.dp, cfg.train.seed, position)
    schedule = Schedule.zero_snr(cfg.train.num_idx, cfg.train.shift_scale)
    par = modules.parallel
    first_stage = par.first_stage
    cache = None
    if cfg.data.latent_cache_dir:
        cache = LatentCache(cfg.data.latent_cache_dir, latent_fingerprint(cfg), par.is_writer(rank),
                            par.first_stage_group)  # fmt: skip
    dp_cp = mesh.get_group("dp_cp")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    autocast = torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
    mcfg = modules.dit.config
    sf, frames = first_stage.spatial_factor, 1 + (cfg.data.num_frames - 1) // first_stage.temporal_factor
    tokens = cfg.train.text_max_length + frames * (cfg.data.height // sf // mcfg.patch_size) * (
        cfg.data.width // sf // mcfg.patch_size
    )
    d = cfg.dist
    watchdog = None
    if d.watchdog:
        watchdog = HangWatchdog(
            run_dir / "hang", rank, env.world_size, d.watchdog_factor, d.watchdog_min_s, d.watchdog_warmup_s
        ).start()
    consecutive_bad = 0
    try:
        for step in range(start, cfg.train.steps):
            PROGRESS.enter("step start", step)
            if watchdog is not None:
                watchdog.step_begin()
            faults.step_start(step)
            t0 = time.perf_counter()
            o = cfg.optim
            total = o.decay_steps or cfg.train.steps
            lr = o.lr * lr_multiplier(step, o.warmup_steps, total, o.min_lr_ratio, o.start_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            data_time = 0.0
            for micro in range(cfg.train.grad_accum):
                PROGRESS.enter("data")
                t_data = time.perf_counter()
                video, captions = batches.next()
                data_time += time.perf_counter() - t_data
                # the first stage's posterior sample: one generator per micro-step (its own stream of seeds)
                stream = FIRST_STAGE_STREAM + micro
                gen = torch.Generator().manual_seed(draw_seed(cfg.train.seed, dp_rank, step, stream))
                PROGRESS.enter("first stage")
                if cache is not None:
                    x0 = cache.encode(first_stage, video.to(device), batches.last_ids, gen).float()
                else:
                    x0 = first_stage.encode(video.to(device), gen).float()  # (B, T, C, h, w) latents
                B = x0.shape[0]
                idx, noise, keep = diffusion_draws(
                    x0.shape, schedule.num_idx, cfg.train, dp_rank, dims.dp, step, micro * B,
                    family_of(mcfg).frame_causal(mcfg),
                )  # fmt: skip
                noise, keep = noise.to(device), keep.to(device)
                a = schedule.alpha(idx).to(device)
                x_t = add_noise(x0, noise, a)
                PROGRESS.enter("forward")
                with autocast:
                    text = modules.encode(captions) * keep[:, None, None]
                    v = modules.dit(x_t, text, idx.to(device).float(), return_local=True)  # (B, T_local, C, H, W)
                a_local = par.local_frames(a) if a.dim() == 2 else a
                err = v_loss_terms(v.float(), par.local_frames(x_t), par.local_frames(x0), a_local)
                # this rank's share of its replica's mean loss (sums over cp to the replica mean; dp averaged by FSDP)
                loss = err.sum() / (x0[0].numel() * B * cfg.train.grad_accum)
                PROGRESS.enter("backward")
                (loss * scaler.scale if scaler is not None else loss).backward()
                loss_sum += loss.detach().double()
            PROGRESS.enter("gradient reduction")
            reduce_gradients(modules)  # parallel.fsdp=false: once, after the last micro-step
            PROGRESS.enter("loss reduction")
            with in_collective("all_reduce(loss)"):
                dist.all_reduce(loss_sum, group=dp_cp)
            global_loss = loss_sum.item() / dims.dp
            if faults.nan_loss(step):
                global_loss = float("nan")
            PROGRESS.enter("gradient norm")
            norm = clip_grad_norm(params, cfg.optim.grad_clip, 1.0 / scaler.scale if scaler is not None else 1.0)
            done = step + 1
            overflow = scaler is not None and math.isfinite(global_loss) and not scaler.update(norm)
            if overflow:  # fp16 gradient overflow: the loss scale halved; skip the update, not a bad step
                log.event(event="loss_scale_overflow", step=done, loss_scale=scaler.scale)
            elif math.isfinite(global_loss) and math.isfinite(norm):
                consecutive_bad = 0
                PROGRESS.enter("optimizer")
                optimizer.step()
                if ema is not None:
                    ema_update(ema, modules.dit, cfg.train.ema_decay)
                dt = time.perf_counter() - t0
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    extra = {"loss_scale": scaler.scale} if scaler is not None else {}
                    log.log(
                        done,
                        loss=global_loss,
                        lr=lr,
                        grad_norm=norm,
                        step_time=dt,
                        tokens_per_s=dims.dp * cfg.data.batch_size * cfg.train.grad_accum * tokens / dt,
                        mem_mb=_memory_mb(device),
                        data_time=data_time,
                        skipped_videos=getattr(dataset, "skipped", 0),
                        **({"latent_cache_hits": cache.hits} if cache is not None else {}),
                        **extra,
                    )
            else:  # NaN/inf guard: drop the update, count it, stop after too many in a row
                consecutive_bad += 1
                counters["bad_steps_total"] += 1
                log.event(event="skipped_step", step=done, loss=global_loss, grad_norm=norm)
                if consecutive_bad >= cfg.train.max_bad_steps:
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive steps with a non-finite loss or gradient "
                        f"(last at step {done}); stopping (train.max_bad_steps={cfg.train.max_bad_steps}). "
                        f"The last good checkpoint is kept: {checkpoint.find_resume(ckpt_root, 'auto')}"
                    )
            optimizer.zero_grad(set_to_none=True)
            log.advance()
            if watchdog is not None:
                watchdog.step_end()
            PROGRESS.enter("stop agreement")
            stopping = stop.agreed(device)
            every = cfg.checkpoint.every
            if (every and done % every == 0) or done == cfg.train.steps or stopping:
                PROGRESS.enter("checkpoint")
                meta = {"data": vars(batches.pos), "layout": dims.describe(), "config": to_yaml(cfg), **counters}
                meta["architecture"] = arch
                if scaler is not None:
                    meta["loss_scale"] = scaler.state_dict()
                saved = checkpoint.save(
                    ckpt_root,
                    done,
                    modules,
                    optimizer,
                    ema,
                    meta,
                    cfg.checkpoint.keep_last,
                    inject=faults.save_fault(done),
                    inject_rank=cfg.debug.fail_rank,
                )
            if stopping:
                log.event(event="preempted", step=done, checkpoint=str(saved))
                log.close()
                if env.local_rank == 0:
                    write_marker(run_dir, done, saved)
                if rank == 0:
                    print(f"cpdit: preempted; checkpoint {saved} saved at step {done}", file=sys.stderr, flush=True)
                return 0 if under_torchelastic() else EXIT_PREEMPTED
    finally:
        if watchdog is not None:
            watchdog.stop()
    PROGRESS.enter("finish")
    failures = finish(cfg, modules, ema, dims, mesh, env, run_dir, log, cfg.train.steps)
    log.close()
    if failures:
        if rank == 0:
            kept = checkpoint.find_resume(ckpt_root, "auto")
            print(
                f"cpdit: training finished and its checkpoint is saved ({kept}), but {failures} of the final "
                "steps (loss plot, samples, export) failed; see the errors above",
                file=sys.stderr,
                flush=True,
            )
        return 1
    return 0


def finish(cfg: JobConfig, modules, ema, dims: ParallelDims, mesh, env: DistEnv, run_dir: Path, log, step: int) -> int:
    """Collective. The loss plot, the samples and the export, after the final checkpoint is on disk. Each reports its
    own error and the others still run; returns how many failed on any rank (the same number on every rank)."""
    errors: list[str] = []

    def attempt(what: str, fn) -> None:
        try:
            errors.extend(f"{what}: {e}" for e in fn() or [])
        except Exception as err:  # noqa: BLE001 - reported, and the next step still runs
            errors.append(f"{what}: {type(err).__name__}: {err}")

    if env.rank == 0:
        attempt("loss plot", lambda: plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png"))
    if cfg.sample.at_end:
        from launch.sample import read_prompts, sample_videos, written_videos

        def samples() -> list[str]:
            out = run_dir / "samples"
            _, write_errors = sample_videos(cfg, modules, ema, dims, mesh, out, env)
            dist.barrier()  # every replica's videos are on disk: rank 0 logs them all, captioned with their prompt
            if env.rank == 0:
                log.log_videos(step, written_videos(out, read_prompts(cfg)))
            return write_errors

        attempt("samples", samples)
    if cfg.train.export:
        from launch.export import export_model

        attempt("export", lambda: export_model(modules.dit, ema, run_dir / "export", env.rank, cfg.model.lora_rank > 0))
    for e in errors:
        print(f"cpdit [rank {env.rank}]: ERROR in {e}", file=sys.stderr, flush=True)
    kinds = torch.tensor([float(any(e.startswith(k) for e in errors)) for k in ("loss plot", "samples", "export")])
    with in_collective("all_reduce(final steps failed)"):
        dist.all_reduce(kinds, op=dist.ReduceOp.MAX)
    return int(kinds.sum().item())
