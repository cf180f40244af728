# Sampling: `cpdit-launch sample` (and the end of `train`). Prompts are split over data-parallel ranks; each
# replica runs the parallelized model (context-parallel inference) with classifier-free guidance and writes
# mp4 + gif + frame-grid PNG per prompt.
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from cpdit.diffusion import Schedule, dynamic_cfg_scale, sample, sample_frames_in_order, sampling_indices
from launch.build import build_first_stage
from launch.config import JobConfig
from launch.env import DistEnv
from launch.media import write_video
from parallel.dims import ParallelDims


def read_prompts(cfg: JobConfig) -> list[str]:
    if cfg.sample.prompts_file:
        path = Path(cfg.sample.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"sample.prompts_file={str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(cfg.sample.prompts)
    if not prompts:
        raise ValueError("no prompts: set sample.prompts or sample.prompts_file")
    return prompts


@contextmanager
def ema_weights(model: torch.nn.Module, ema: dict | None):
    """Temporarily swap the EMA weights in (shard by shard)."""
    if ema is None:
        yield
        return
    params = {n: p for n, p in model.named_parameters() if n in ema}
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ema[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@torch.no_grad()
def sample_videos(cfg: JobConfig, modules, ema, dims: ParallelDims, mesh, out_dir: Path, env: DistEnv) -> list[Path]:
    """Collective over all ranks. Returns the files this rank wrote."""
    prompts = read_prompts(cfg)
    dp_rank, dp = dims.dp_rank(env.rank), dims.dp
    mine = prompts[dp_rank::dp]
    per_rank = -(-len(prompts) // dp)  # every replica runs the same number of forwards (FSDP collectives)
    mine = mine + [mine[-1] if mine else prompts[0]] * (per_rank - len(mine))
    coords = dims.coords(env.rank)
    writer = coords["cp"] == 0 and coords["tp"] == 0
    schedule = Schedule.zero_snr(cfg.train.num_idx, cfg.train.shift_scale)
    first_stage = build_first_stage(cfg, dims, mesh, next(modules.parameters()).device)
    d, c = cfg.data, modules.dit.config
    steps = len(sampling_indices(cfg.sample.num_steps, schedule.num_idx))
    written: list[Path] = []
    modules.eval()
    with ema_weights(modules.dit, ema):
        for i, prompt in enumerate(mine):
            text = modules.encode([prompt])
            gen = torch.Generator().manual_seed(cfg.sample.seed + 1000 * (dp_rank * per_rank + i))
            frames = 1 + (d.num_frames - 1) // first_stage.temporal_factor
            sf = first_stage.spatial_factor
            noise = torch.randn(1, frames, c.in_channels, d.height // sf, d.width // sf, generator=gen)
            counter = {"n": 0}

            def denoise(x, idx, text=text, counter=counter):
                both = modules.dit(
                    torch.cat([x, x]), torch.cat([text, torch.zeros_like(text)]), torch.cat([idx, idx]).float()
                )
                v_c, v_u = both.chunk(2)
                s = cfg.sample.guidance_scale
                if cfg.sample.dynamic_cfg:  # along each trajectory (per frame when frames are generated in order)
                    s = dynamic_cfg_scale(s, counter["n"] % steps, steps)
                counter["n"] += 1
                return v_u + s * (v_c - v_u)

            run = sample_frames_in_order if getattr(c, "frame_causal", False) else sample
            video = first_stage.decode(run(denoise, noise, schedule, cfg.sample.num_steps, cfg.sample.sampler))
            if writer and i < len(prompts[dp_rank::dp]):
                slug = "".join(ch if ch.isalnum() else "_" for ch in prompt)[:48]
                written += write_video(video[0], out_dir / f"{dp_rank * per_rank + i:03d}_{slug}", fps=d.fps)
    modules.train()
    return written


def sample_job(cfg: JobConfig, env: DistEnv) -> int:
    """`cpdit-launch sample`: load a checkpoint of the training job and sample its prompts."""
    from launch import checkpoint
    from launch.build import architecture, build, new_ema
    from launch.distributed import distributed

    p = cfg.parallel
    dims = ParallelDims(env.world_size, p.cp_size, p.model_parallel_size, p.ulysses_size, p.dp_replicate)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    wanted = cfg.sample.checkpoint or "auto"
    if checkpoint.find_resume(run_dir / "checkpoints", wanted) is None:  # before any process group exists
        raise FileNotFoundError(
            f"no complete checkpoint under {run_dir / 'checkpoints'}; train first or set sample.checkpoint=DIR"
        )
    with distributed(env, cfg.dist.backend, cfg.dist.timeout_s) as device:
        mesh = dims.build_mesh(device.type)
        modules = build(cfg, dims, mesh, device)
        path = checkpoint.select_resume(run_dir / "checkpoints", wanted, architecture(cfg, modules.dit.config))
        optimizer = torch.optim.AdamW([q for q in modules.parameters() if q.requires_grad], lr=cfg.optim.lr)
        ema = new_ema(modules.dit) if cfg.train.ema_decay > 0 else None
        meta = checkpoint.load(path, modules, optimizer, ema)
        files = sample_videos(cfg, modules, ema, dims, mesh, run_dir / "samples" / f"step_{meta['step']:08d}", env)
        for f in files:
            if f.suffix == ".mp4":
                print(f"cpdit sample: wrote {f}", flush=True)
        del mesh, modules, optimizer
    return 0
