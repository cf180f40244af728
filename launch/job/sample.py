# Sampling: `cpdit-launch sample` (and the end of `train`). Prompts are split over data-parallel ranks; each
# replica runs the parallelized model (context-parallel inference) with classifier-free guidance and writes
# mp4 + gif + frame-grid PNG per prompt.
from __future__ import annotations

import sys
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch

from cpdit.diffusion import Schedule, cfg_denoiser, sample, sample_frames_in_order, sampling_indices
from cpdit.first_stage import latent_frames
from cpdit.image_cond import image_latents
from cpdit.models.cogvideox.config import CogVideoXConfig
from cpdit.models.patch import pad_leading_frames, patch_frame_padding
from cpdit.models.registry import family_of
from cpdit.seeding import generator
from launch.config import JobConfig
from launch.env import DistEnv
from launch.job.media import write_video
from launch.job.prompts import load_image, read_requests
from launch.job.resident import sampling_stages
from parallel.comm import agree
from parallel.dims import ParallelDims
from parallel.fsdp import adamw_foreach
from parallel.parallelize import Parallelized


class SamplingFailed(RuntimeError):
    """Every rank raises it at the same point of sampling, so they can all go on to the next step of the job."""


class CollectiveFailed(RuntimeError):
    """A rank failed inside sampling's collectives; its peers are waiting in them for it. Not to be caught: the
    process ends, and its launcher (torchrun, mpirun, srun) stops the others at once."""


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


def video_stem(k: int, prompt: str) -> str:
    """File stem of prompt k's video: its index and a slug of the prompt."""
    return f"{k:03d}_" + "".join(ch if ch.isalnum() else "_" for ch in prompt)[:48]


def written_videos(out_dir: Path, prompts: list[str]) -> list[tuple[Path, str]]:
    """(mp4, prompt) for every prompt whose video is in out_dir (whichever replica wrote it)."""
    found = [(out_dir / f"{video_stem(k, p)}.mp4", p) for k, p in enumerate(prompts)]
    return [(f, p) for f, p in found if f.is_file()]


def agreed(what: str, rank: int, fn):
    """Collective: run this rank's own work `fn` (no collectives in it), then agree: every rank gets its result, or
    every rank raises SamplingFailed at this same point when any rank's `fn` raised."""
    try:
        out, failed = fn(), None
    except Exception as err:  # noqa: BLE001 - agreed on below, then raised on every rank
        out, failed = None, err
    if agree([failed is not None], "max", what)[0]:
        why = f"{type(failed).__name__}: {failed}" if failed else "another rank failed (its error is in its log)"
        raise SamplingFailed(f"{what} on rank {rank}: {why}")
    return out


@torch.no_grad()
def sample_videos(
    cfg: JobConfig, modules, par: Parallelized, ema, out_dir: Path, env: DistEnv
) -> tuple[list[tuple[Path, str]], list[str]]:
    """Collective over all ranks. Returns ([(mp4 written by this rank, its prompt)], [write errors of this rank]).

    Prompt k goes to data-parallel replica k % dp, is named `kkk_<prompt>` and starts from noise seeded by
    (sample.seed, k), so a prompt's video does not depend on the layout. The ranks stop together when one fails:
    in its own work (the prompts, a text embedding, the noise) every rank raises SamplingFailed at once; inside the
    model's collectives the failing rank raises CollectiveFailed, which ends its process and so the job. A failed
    write is reported and the loop goes on (the other ranks are in the same forwards). An image-to-video model
    samples from prompt k's image, encoded as in training (on the rank holding latent frame 0: zeros elsewhere)."""
    rank, dims, first_stage = env.rank, par.dims, par.first_stage
    requests = agreed("reading the prompts", rank, lambda: read_requests(cfg))
    prompts = [r.prompt for r in requests]
    dp_rank, dp = dims.dp_rank(rank), dims.dp
    mine = list(range(dp_rank, len(prompts), dp))
    per_rank = -(-len(prompts) // dp)  # every replica runs the same number of forwards (FSDP collectives)
    mine = mine + [None] * (per_rank - len(mine))
    writer = dims.is_writer(rank)
    schedule = Schedule.zero_snr(cfg.train.num_idx, cfg.train.shift_scale)
    d, c = cfg.data, modules.dit.config
    steps = len(sampling_indices(cfg.sample.num_steps, schedule.num_idx))
    fault = cfg.debug.fail_sample if rank == cfg.debug.fail_rank else None
    written: list[tuple[Path, str]] = []
    errors: list[str] = []
    frames = latent_frames(d.num_frames, first_stage.temporal_factor)
    padding = patch_frame_padding(frames, modules.dit.frames_per_patch)
    image_model = isinstance(c, CogVideoXConfig) and c.image_conditioned

    def noise_for(i: int, k: int | None) -> torch.Tensor:
        """Prompt k's starting noise: this rank's own work (the text encoder may be FSDP-sharded: a collective)."""
        if fault == "prompt" and i == 0:
            raise RuntimeError(f"injected failure preparing a prompt on rank {rank} (debug.fail_sample)")
        gen = generator(cfg.sample.seed, "sample", k or 0)  # prompt k's noise, whichever rank draws it
        sf = first_stage.spatial_factor
        # CogVideoX 1.5: sampled with leading frames that are dropped before decoding
        noise = torch.randn(1, frames + padding, c.out_channels, d.height // sf, d.width // sf, generator=gen)
        return noise, image_for(k) if image_model else None

    def image_for(k: int | None) -> torch.Tensor:
        """Prompt k's image latents (1, T, C, h, w), padded as the noise: this rank's own work (no collective)."""
        sf, C = first_stage.spatial_factor, first_stage.latent_channels
        out = torch.zeros(1, frames, C, d.height // sf, d.width // sf)
        if k is not None and par.holds_first_frame(frames):
            gen = generator(cfg.sample.seed, "image", k)
            image = load_image(requests[k].image, d.height, d.width)[None, None]  # (1, 1, 3, H, W)
            if cfg.sample.image_sigma > 0:
                image = image + cfg.sample.image_sigma * torch.randn(image.shape, generator=gen)
            encoded = par.local_first_stage.encode(image.to(device), gen).float().cpu()
            out = image_latents(encoded, frames, torch.ones(1, dtype=torch.bool))
        return pad_leading_frames(out, padding)

    device = next(modules.dit.parameters()).device
    modules.eval()
    with sampling_stages(cfg, modules, par, device), ema_weights(modules.dit, ema):
        first_stage = par.first_stage  # the VAE built for sampling when training runs on precomputed posteriors
        for i, k in enumerate(mine):
            noise, image = agreed(f"preparing prompt {i} of the replica", rank, lambda i=i, k=k: noise_for(i, k))
            prompt = prompts[k if k is not None else 0]

            def predict(x, idx, text, i=i, image=image):  # (v_c, v_u): both branches in one batch
                if fault == "forward" and i == 0:
                    raise RuntimeError(f"injected failure in a sampling forward on rank {rank} (debug.fail_sample)")
                x = x if image is None else torch.cat([x, image.to(x)], dim=2)  # [noisy | image] latents
                both = modules.dit(
                    torch.cat([x, x]), torch.cat([text, torch.zeros_like(text)]), torch.cat([idx, idx]).float()
                )
                return both.chunk(2)

            run = sample_frames_in_order if family_of(c).frame_causal(c) else sample
            try:  # collectives (FSDP, cp, tp): a rank failing here leaves its peers waiting inside them
                text = modules.encode([prompt])
                denoise = cfg_denoiser(
                    partial(predict, text=text), cfg.sample.guidance_scale, steps, cfg.sample.dynamic_cfg
                )
                latents = run(denoise, noise, schedule, cfg.sample.num_steps, cfg.sample.sampler)
                video = first_stage.decode(latents[:, padding:])
            except Exception as err:
                raise CollectiveFailed(f"sampling prompt {k} on rank {rank}: {type(err).__name__}: {err}") from err
            if writer and k is not None:
                try:
                    files = write_video(video[0], out_dir / video_stem(k, prompt), fps=d.fps)
                    written.append((files[0], prompt))
                except Exception as err:  # disk full, codec missing: this video is lost, the others are not
                    errors.append(
                        f"writing the video of prompt {k} ({prompt!r}) to {out_dir}: {type(err).__name__}: {err}"
                    )
    modules.train()
    return written, errors


def sample_job(cfg: JobConfig, env: DistEnv) -> int:
    """`cpdit-launch sample`: load a checkpoint of the training job and sample its prompts."""
    from launch.distributed import distributed
    from launch.job import checkpoint
    from launch.job.build import architecture, build
    from launch.job.ema import new_ema

    dims = ParallelDims.from_config(cfg.parallel, env.world_size)
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    wanted = cfg.sample.checkpoint or "auto"
    if checkpoint.find_resume(run_dir / "checkpoints", wanted) is None:  # before any process group exists
        raise FileNotFoundError(
            f"no complete checkpoint under {run_dir / 'checkpoints'}; train first or set sample.checkpoint=DIR"
        )
    with distributed(env, cfg.dist.backend, cfg.dist.timeout_s) as device:
        mesh = dims.build_mesh(device.type, timedelta(seconds=cfg.dist.timeout_s))
        modules, par = build(cfg, dims, mesh, device)
        path = checkpoint.select_resume(run_dir / "checkpoints", wanted, architecture(cfg, modules.dit.config))
        params = [q for q in modules.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, foreach=adamw_foreach(params))
        ema = new_ema(modules.dit) if cfg.train.ema_decay > 0 else None
        meta = checkpoint.load(path, modules, optimizer, ema)
        out = run_dir / "samples" / f"step_{meta['step']:08d}"
        files, errors = sample_videos(cfg, modules, par, ema, out, env)
        for f, _ in files:
            print(f"cpdit sample: wrote {f}", flush=True)
        for e in errors:
            print(f"cpdit sample: ERROR {e}", file=sys.stderr, flush=True)
        del mesh, modules, par, optimizer
    return 1 if errors else 0
