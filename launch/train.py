# The training job behind `cpdit-launch train`: CogVideoX's v-prediction diffusion objective on a parallelized
# CPDiT (dp x cp x tp, FSDP2), AdamW with warm-up + cosine, global-norm clipping, accumulation, EMA, NaN guard,
# DCP checkpoints with exact resume (also under another layout), run directory with metrics, loss curve,
# wandb (offline) files, sample videos and a safetensors/diffusers export.
from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from cpdit import CPDiT, CPDiTConfig
from cpdit.diffusion import Schedule, add_noise, sample_timesteps, v_loss_terms
from cpdit.first_stage import PixelStage
from cpdit.lora import add_lora
from cpdit.text import HashedTextEncoder
from launch import checkpoint
from launch.config import JobConfig, to_yaml
from launch.data import DataPosition, DistributedBatches, build_dataset
from launch.distributed import distributed
from launch.env import DistEnv
from launch.metrics import RunLog, plot_loss
from parallel.dims import ParallelDims
from parallel.fsdp import apply_grad_allreduce, shard_module
from parallel.parallelize import parallelize
from parallel.state import assign_full, load_full_state_dict
from parallel.train_utils import clip_grad_norm, ema_update


class Trainable(nn.Module):
    """Everything the optimizer updates: the DiT and a trainable text encoder (one module for DCP state dicts).
    A frozen encoder (T5) is kept outside the module tree: it is neither optimized nor checkpointed."""

    def __init__(self, dit: CPDiT, text: nn.Module | None, frozen_text=None):
        super().__init__()
        self.dit, self.text = dit, text
        self.__dict__["frozen_text"] = frozen_text

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.text(captions) if self.text is not None else self.frozen_text(captions)


def new_ema(model: nn.Module) -> dict[str, torch.Tensor]:
    """EMA copies of the trainable parameters (same sharding)."""
    return {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}


def model_config(cfg: JobConfig) -> CPDiTConfig:
    m = cfg.model
    overrides = dict(
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        attention_head_dim=m.attention_head_dim,
        patch_size=m.patch_size,
        text_embed_dim=m.text_embed_dim,
        pos_embedding=m.pos_embedding,
    )
    # Pixel-space first stage (no pretrained VAE needed): RGB in, RGB out unless set explicitly.
    overrides["in_channels"] = m.in_channels or 3
    overrides["out_channels"] = m.out_channels or overrides["in_channels"]
    return CPDiTConfig.preset(m.preset, **overrides)


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """SAT's LambdaWarmUpCosineScheduler: linear warm-up from 0 to 1, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * t))


def draw_seed(seed: int, dp_rank: int, step: int, micro: int) -> int:
    """Every random draw of a micro-step: identical on the cp x tp ranks of one replica, distinct across dp."""
    return (((seed * 1_000_003 + dp_rank) * 1_000_033 + step) * 131 + micro) % 2**63


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(cfg: JobConfig, dims: ParallelDims, mesh, device: torch.device) -> Trainable:
    mcfg = model_config(cfg)
    if cfg.model.pretrained:  # the architecture comes from the checkpoint
        from cpdit.convert import config_from_diffusers, load_diffusers_state_dict

        mcfg = config_from_diffusers(load_diffusers_state_dict(cfg.model.pretrained)[0])
    frozen = None
    if cfg.text.encoder == "t5":
        from cpdit.text import T5TextEncoder

        frozen = T5TextEncoder(cfg.text.path, cfg.train.text_max_length, cfg.text.cache_dir).to(device)
        if frozen.dim != mcfg.text_embed_dim:
            raise ValueError(
                f"T5 width {frozen.dim} != model text_embed_dim {mcfg.text_embed_dim}; set "
                f"model.text_embed_dim={frozen.dim}"
            )
    with torch.device("meta"):
        text = HashedTextEncoder(mcfg.text_embed_dim, cfg.train.text_max_length) if frozen is None else None
        modules = Trainable(CPDiT(mcfg), text, frozen)
        if cfg.model.lora_rank:
            add_lora(modules.dit, cfg.model.lora_rank, cfg.model.lora_alpha)
    p = cfg.parallel
    parallelize(
        modules.dit,
        dims,
        mesh,
        activation_checkpointing="full" if cfg.model.gradient_checkpointing else "none",
        fsdp=p.fsdp,
        attention=p.attention,
        layout=p.layout,
    )
    # The text encoder's gradients reduce like the model's (parallel/fsdp.py); they pass through the model's
    # output-gradient scaling, so FSDP's plain average gives the same sum over cp / mean over dp.
    if modules.text is not None and p.fsdp and dims.size("dp_shard_cp") > 1:
        shard_module(modules.text, mesh["dp_shard_cp"], torch.float32)
    elif modules.text is not None and dims.size("dp_cp") > 1:
        apply_grad_allreduce(modules.text, mesh.get_group("dp_cp"), dims.dp)
    modules.to_empty(device=device)
    modules.dit.init_weights(cfg.train.seed, assign=assign_full)
    if modules.text is not None:
        modules.text.init_weights(cfg.train.seed, assign=assign_full)
    if cfg.model.pretrained:
        from cpdit.convert import load_diffusers_state_dict, state_dict_from_diffusers

        weights = state_dict_from_diffusers(load_diffusers_state_dict(cfg.model.pretrained)[1])
        load_full_state_dict(modules.dit, weights, strict=not cfg.model.lora_rank)  # adapters keep their init
    return modules


def train(cfg: JobConfig, env: DistEnv) -> int:
    p = cfg.parallel
    dims = ParallelDims(env.world_size, p.cp_size, p.model_parallel_size, p.ulysses_size, p.dp_replicate)
    if cfg.train.mixed_precision == "fp16":
        raise ValueError("train.mixed_precision='fp16' is not supported yet (needs a sharded grad scaler); use bf16")
    with distributed(env, cfg.dist.backend, cfg.dist.timeout_s) as device:
        torch.manual_seed(cfg.train.seed)
        mesh = dims.build_mesh(device.type)
        result = _train(cfg, env, dims, mesh, device)
        del mesh
    return result


def _train(cfg: JobConfig, env: DistEnv, dims: ParallelDims, mesh, device: torch.device) -> int:
    rank, dp_rank = env.rank, dims.dp_rank(env.rank)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    ckpt_root = run_dir / "checkpoints"
    modules = build(cfg, dims, mesh, device)
    params = [q for q in modules.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    ema = new_ema(modules.dit) if cfg.train.ema_decay > 0 else None
    start, position, counters = 0, DataPosition(), {"bad_steps_total": 0}
    resume = checkpoint.find_resume(ckpt_root, cfg.checkpoint.resume)
    if resume is not None:
        meta = checkpoint.load(resume, modules, optimizer, ema)
        start, position = meta["step"], DataPosition(**meta["data"])
        counters["bad_steps_total"] = meta.get("bad_steps_total", 0)
    log = RunLog(
        run_dir, cfg.train.steps, start, cfg.logging.wandb, cfg.logging.wandb_project, to_yaml(cfg), enabled=rank == 0
    )
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if resume is not None:
            log.event(event="resume", from_checkpoint=str(resume), step=start, layout=dims.describe())
    dataset = build_dataset(cfg, cfg.train.seed)
    batches = DistributedBatches(dataset, cfg.data.batch_size, dp_rank, dims.dp, cfg.train.seed, position)
    schedule = Schedule.zero_snr(cfg.train.num_idx, cfg.train.shift_scale)
    first_stage = PixelStage()  # the CogVideoX VAE (context-parallel) is the first-stage issue
    dp_cp = mesh.get_group("dp_cp")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    mcfg = modules.dit.config
    tokens = cfg.train.text_max_length + cfg.data.num_frames * (cfg.data.height // mcfg.patch_size) * (
        cfg.data.width // mcfg.patch_size
    )
    consecutive_bad = 0
    step = start
    for step in range(start, cfg.train.steps):
        if cfg.debug.fail_at_step == step and rank == cfg.debug.fail_rank:
            raise RuntimeError(f"injected failure at step {step} on rank {rank} (debug.fail_at_step)")
        t0 = time.perf_counter()
        lr = cfg.optim.lr * lr_multiplier(step, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        data_time = 0.0
        for micro in range(cfg.train.grad_accum):
            t_data = time.perf_counter()
            video, captions = batches.next()
            data_time += time.perf_counter() - t_data
            x0 = first_stage.encode(video.to(device))  # (B, T, C, h, w) latents
            gen = torch.Generator().manual_seed(draw_seed(cfg.train.seed, dp_rank, step, micro))
            B = x0.shape[0]
            idx = sample_timesteps(B, schedule.num_idx, dp_rank, dims.dp, gen)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            keep = (torch.rand(B, generator=gen) >= cfg.train.ucg_rate).to(device)  # classifier-free dropout
            a = schedule.alpha(idx).to(device)
            x_t = add_noise(x0, noise, a)
            with autocast:
                text = modules.encode(captions) * keep[:, None, None]
                v = modules.dit(x_t, text, idx.to(device).float(), return_local=True)  # (B, T_local, C, H, W)
            seq = modules.dit.context.bind(x0.shape[1], v.shape[-1] * v.shape[-2] // mcfg.patch_size**2, text.shape[1])
            err = v_loss_terms(v, seq.shard_frames(x_t, 1), seq.shard_frames(x0, 1), a)
            # this rank's share of its replica's mean loss (sums over cp to the replica mean; dp averaged by FSDP)
            loss = err.sum() / (x0[0].numel() * B * cfg.train.grad_accum)
            loss.backward()
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum, group=dp_cp)
        global_loss = loss_sum.item() / dims.dp
        if cfg.debug.nan_at_step == step:
            global_loss = float("nan")
        norm = clip_grad_norm(params, cfg.optim.grad_clip)
        done = step + 1
        if math.isfinite(global_loss) and math.isfinite(norm):
            consecutive_bad = 0
            optimizer.step()
            if ema is not None:
                ema_update(ema, modules.dit, cfg.train.ema_decay)
            dt = time.perf_counter() - t0
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
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
                )
        else:  # NaN/inf guard: drop the update, count it, stop after too many in a row
            consecutive_bad += 1
            counters["bad_steps_total"] += 1
            log.event(event="skipped_step", step=done, loss=global_loss, grad_norm=norm)
            if consecutive_bad >= cfg.train.max_bad_steps:
                raise FloatingPointError(
                    f"{consecutive_bad} consecutive steps with a non-finite loss or gradient "
                    f"(last at step {done}); stopping (train.max_bad_steps={cfg.train.max_bad_steps}). "
                    "The last good checkpoint is kept."
                )
        optimizer.zero_grad(set_to_none=True)
        log.advance()
        every = cfg.checkpoint.every
        if (every and done % every == 0) or done == cfg.train.steps:
            meta = {"data": vars(batches.pos), "layout": dims.describe(), "config": to_yaml(cfg), **counters}
            checkpoint.save(
                ckpt_root,
                done,
                modules,
                optimizer,
                ema,
                meta,
                cfg.checkpoint.keep_last,
                fail_after_write=cfg.debug.fail_save_at_step == done,
            )
    log.close()
    if rank == 0:
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if cfg.sample.at_end:
        from launch.sample import sample_videos

        sample_videos(cfg, modules, ema, dims, mesh, run_dir / "samples", env)
    if cfg.train.export:
        from launch.export import export_model

        export_model(modules.dit, ema, run_dir / "export", rank, lora=bool(cfg.model.lora_rank))
    return 0
