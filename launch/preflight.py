# Checks that need the world size or the file system, run by cpdit-launch before it starts any process and by
# every rank before it creates a process group: a bad shape or a missing file is answered in a second with the
# knob, the value and the fix, never by a hang or a traceback from deep inside torch.
from __future__ import annotations

import json
from pathlib import Path

import torch

from cpdit.first_stage import latent_frames
from cpdit.models.cogvideox.config import CogVideoXConfig
from cpdit.safe_paths import OutsideDirectory, plain_tree
from launch.config import ConfigError, JobConfig
from parallel.dims import ParallelDims


def checked_model_config(cfg: JobConfig):
    """The DiT config the job would build; a bad model knob is a ConfigError naming it."""
    from launch.job.build import model_config

    try:
        return model_config(cfg)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def checked_first_stage(cfg: JobConfig, dims: ParallelDims) -> tuple[int, int, int]:
    """(channels, temporal factor, spatial factor) of the first stage; checks the VAE knobs."""
    f = cfg.first_stage
    if f.kind == "pixel":
        return 3, 1, 1
    if f.ckpt_path:
        _need_dir("first_stage.ckpt_path", f.ckpt_path, hint="a diffusers AutoencoderKLCogVideoX directory")
    if f.cp_size not in (None, 1, dims.cp):
        raise ConfigError(
            f"first_stage.cp_size={f.cp_size}: the VAE splits frames over the model's cp group "
            f"(parallel.cp_size={dims.cp}) or not at all; use null or 1"
        )
    from launch.job.build import first_stage_config

    try:
        c = first_stage_config(cfg)
    except (ValueError, OSError) as err:
        raise ConfigError(f"first_stage: {err}") from None
    r, F = c.temporal_compression_ratio, cfg.data.num_frames
    # The VAE keeps a leading odd frame apart at every 2x time step: F frames encode to 1 + (F - 1) / r latents, and
    # those decode back to F frames only when every count on the way is odd, i.e. F = 1 + 2 r k.
    if r > 1 and (F - 1) % (2 * r):
        good = ", ".join(str(1 + 2 * r * k) for k in range(1, 7))
        why = "does not fit the VAE's frame rule:"
        if (F - 1) % r == 0:
            latents = latent_frames(F, r)
            why = f"encodes to {latents} latent frames, an even count that decodes to {r * latents} frames, not {F}:"
        raise ConfigError(f"data.num_frames={F} {why} use 1 + {2 * r}k frames ({good}, ...)")
    return c.latent_channels, r, c.spatial_factor


def job_model(cfg: JobConfig):
    """The DiT config of the job: its preset's, or the config.json of model.pretrained (None where that directory
    cannot be read: _check_files names it)."""
    if not cfg.model.pretrained:
        return checked_model_config(cfg)
    from cpdit.diffusers_io import weight_files
    from launch.job.build import pretrained_config

    try:
        weight_files(cfg.model.pretrained)
    except (OSError, ValueError, OutsideDirectory):
        return None
    try:
        return pretrained_config(cfg.model.pretrained)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: {err}") from None


def _check_buckets(cfg: JobConfig, dims: ParallelDims, command: str) -> None:
    """Each bucket of data.buckets passes the shape checks of a job of its shape, and every bucket can run at its
    cp degree (launch/bucket_plan.py: pinned degrees, frames per rank, clips per sub-group)."""
    from launch.bucket_plan import bucket_config, buckets_of, plan_buckets

    for i, bucket in enumerate(buckets_of(cfg)):
        try:  # under dynamic cp a bucket may run below cp_size: plan_buckets checks its frames against its degree
            _check_shapes(bucket_config(cfg, bucket), dims, command, cp_frames=not cfg.parallel.dynamic_cp)
        except ConfigError as err:
            raise ConfigError(
                f"data.buckets[{i}]={bucket.name} (frames x height x width, checked as data.num_frames, data.height, "
                f"data.width): {err}"
            ) from None
    plan_buckets(cfg, dims, predict=False)


def _check_shapes(cfg: JobConfig, dims: ParallelDims, command: str, cp_frames: bool = True) -> None:
    channels, tf, sf = checked_first_stage(cfg, dims)
    m = job_model(cfg)
    d, p = cfg.data, cfg.parallel
    what = f"model.pretrained={cfg.model.pretrained}" if cfg.model.pretrained else f"model.preset={cfg.model.preset}"
    latents = latent_frames(d.num_frames, tf)
    if m is not None:
        if isinstance(m, CogVideoXConfig):
            _check_cogvideox(cfg, m, what, latents, tf, sf, command)
        image = isinstance(m, CogVideoXConfig) and m.image_conditioned  # [noisy | image] latents in
        if m.in_channels != channels * (2 if image else 1):
            want = f"2 x {channels} = {2 * channels}" if image else str(channels)
            raise ConfigError(
                f"model.in_channels={m.in_channels}, but the first stage ({cfg.first_stage.kind}) gives {channels} "
                f"channels; remove model.in_channels or set it to {want}"
                if not cfg.model.pretrained
                else f"{what} takes {m.in_channels} latent channels, but the first stage ({cfg.first_stage.kind}) "
                f"gives {channels}; use its first stage (first_stage.kind=vae for CogVideoX)"
            )
        for name, size in (("data.height", d.height), ("data.width", d.width)):
            if size % (m.patch_size * sf):
                unit = m.patch_size * sf
                raise ConfigError(
                    f"{name}={size} is not divisible by the patch size {m.patch_size} x first-stage downsampling "
                    f"{sf}; use a multiple of {unit} (or change model.patch_size)"
                )
        _check_images(cfg, image, what, command)
        _check_family(cfg, m, dims.tp)
        if d.dataset == "synthetic_i2v" and not image and command == "train":
            raise ConfigError(
                f"data.dataset='synthetic_i2v' captions name only the motion (colour, shape and start are in the "
                f"first frame), but {what} is text-to-video and never sees it; use data.dataset='synthetic', or an "
                "image-to-video model (model.in_channels = 2 x model.out_channels)"
            )
    per_patch = m.frames_per_patch if isinstance(m, CogVideoXConfig) else 1
    patch_frames = -(-latents // per_patch)  # after CogVideoX 1.5's leading copies of frame 0
    if cp_frames and patch_frames < p.cp_size:
        count = f"{latents} latent frames"
        if per_patch > 1:
            count += f" in {patch_frames} patch-frame(s) of {per_patch} (model.patch_size_t)"
        raise ConfigError(
            f"data.num_frames={d.num_frames} ({count}) < parallel.cp_size={p.cp_size}: every "
            "context-parallel rank needs at least one frame; lower parallel.cp_size or raise data.num_frames"
        )
    if d.dataset not in ("folder", "precomputed") and d.num_samples < d.batch_size * dims.dp:
        raise ConfigError(
            f"data.num_samples={d.num_samples} is less than data.batch_size={d.batch_size} x {dims.dp} data-parallel "
            "ranks; raise data.num_samples or lower data.batch_size"
        )
    if cfg.dist.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "dist.backend='nccl' needs CUDA, which this machine or torch build lacks; use 'auto' or 'gloo'"
        )
    if cfg.debug.fail_rank >= dims.world_size:
        raise ConfigError(f"debug.fail_rank={cfg.debug.fail_rank} is not a rank of this {dims.world_size}-rank job")


def _check_cogvideox(
    cfg: JobConfig, m: CogVideoXConfig, what: str, latents: int, tf: int, sf: int, command: str
) -> None:
    if m.use_learned_positional_embeddings:
        _check_learned_table(cfg, m, what, latents, tf, sf)
    if m.image_conditioned and cfg.data.latent_cache_dir and cfg.train.image_noise != "clip":
        raise ConfigError(
            f"{what} is an image-to-video transformer (in_channels={m.in_channels} = 2 x {m.out_channels}: noisy "
            f"and image latents) and train.image_noise={cfg.train.image_noise!r} noises its first frame anew each "
            "step, which data.latent_cache_dir cannot keep: set train.image_noise=clip (the noise drawn once per "
            "clip, as diffusers' I2V fine-tuning script does; the cache keeps that image's posterior) or remove "
            "data.latent_cache_dir"
        )


def _check_images(cfg: JobConfig, image_model: bool, what: str, command: str) -> None:
    """Image-to-video sampling: every prompt has a readable image of the clips' size; no images for other models."""
    from launch.job.prompts import load_image, read_requests

    if command == "precompute" or (command != "sample" and not cfg.sample.at_end and not cfg.sample.every):
        return
    try:
        requests = read_requests(cfg)
    except (ValueError, OSError) as err:
        raise ConfigError(str(err)) from None
    if not image_model:
        if any(r.image for r in requests):
            raise ConfigError(
                f"sample.images / image<TAB>prompt lines are for image-to-video models; {what} is text-to-video: "
                "remove the images"
            )
        return
    for r in requests:
        if not r.image:
            raise ConfigError(
                f"{what} samples from an image: prompt {r.prompt!r} has none; give sample.images (one per prompt) "
                "or image<TAB>prompt lines in sample.prompts_file"
            )
        if not Path(r.image).is_file():
            raise ConfigError(f"the image {r.image!r} of prompt {r.prompt!r} does not exist")
        try:
            load_image(r.image, cfg.data.height, cfg.data.width)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_learned_table(cfg: JobConfig, m: CogVideoXConfig, what: str, latents: int, tf: int, sf: int) -> None:
    """A learned position table (CogVideoX-5B-I2V) has rows for the checkpoint's shape only."""
    frames_for = 1 + (m.sample_latent_frames - 1) * tf  # the clip length this first stage encodes to them
    want = {
        "data.num_frames": (frames_for, latents == m.sample_latent_frames, cfg.data.num_frames),
        "data.height": (m.sample_height * sf, cfg.data.height // sf == m.sample_height, cfg.data.height),
        "data.width": (m.sample_width * sf, cfg.data.width // sf == m.sample_width, cfg.data.width),
        "train.text_max_length": (
            m.max_text_seq_length,
            cfg.train.text_max_length == m.max_text_seq_length,
            cfg.train.text_max_length,
        ),
    }
    wrong = [f"{k}={v} (needs {good})" for k, (good, ok, v) in want.items() if not ok]
    if wrong:
        fix = " ".join(f"{k}={good}" for k, (good, ok, _) in want.items() if not ok)
        raise ConfigError(
            f"{what} has a learned position table (use_learned_positional_embeddings) for {frames_for} frames "
            f"of {m.sample_height * sf}x{m.sample_width * sf} and {m.max_text_seq_length} text tokens only: "
            f"{', '.join(wrong)}; set {fix}"
        )


def _check_family(cfg: JobConfig, m, tp: int) -> None:
    """What the model's family supports (cpdit/models/registry.py), and whether its tensor-parallel plan splits
    over `tp` ranks (checked on a meta-device model: no memory, no processes)."""
    from cpdit.lora import add_lora
    from cpdit.models.registry import FAMILIES, family_of
    from parallel.tensor_parallel import check_tensor_parallel

    family = family_of(m)
    if cfg.model.lora_rank and not family.lora:
        lora = " and ".join(f.title for f in FAMILIES.values() if f.lora)
        raise ConfigError(f"model.preset={cfg.model.preset}: model.lora_rank is for the {lora} presets")
    if tp > 1:  # the head rule (parallel.tensor_parallel.heads_error) and the widths of the family's plan
        with torch.device("meta"):
            model = family.build(m)
            if cfg.model.lora_rank:
                add_lora(model, cfg.model.lora_rank, cfg.model.lora_alpha)
        try:
            check_tensor_parallel(model, dict(family.tp_plan), tp)
        except ValueError as err:
            raise ConfigError(f"parallel.{err}") from None


def _need_dir(key: str, value: str, *children: str, hint: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"{key}={value!r} is not a directory; {hint}")
    for child in children:
        if not (path / child).exists():
            raise ConfigError(f"{key}={value!r} has no {child}; {hint}")
    return path


def _check_files(cfg: JobConfig, command: str) -> None:
    d = cfg.data
    if d.dataset == "folder" and command in ("train", "precompute"):
        root = _need_dir("data.path", d.path, "videos", "labels", hint="expected videos/*.mp4 and labels/*.txt")
        stems = {p.stem for p in (root / "labels").glob("*.txt")}
        if not any(v.stem in stems for v in (root / "videos").glob("*.mp4")):
            raise ConfigError(f"data.path={d.path!r}: no videos/<name>.mp4 has a labels/<name>.txt caption")
    if cfg.text.encoder == "t5":
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ConfigError("text.encoder='t5' needs the transformers package: pip install 'cpdit[t5]'")
        t5 = _need_dir("text.path", cfg.text.path, "config.json", hint="point it at a local T5 encoder directory")
        try:
            plain_tree(t5)
        except OutsideDirectory as err:
            raise ConfigError(f"text.path={cfg.text.path!r}: {err}") from None
        try:
            width = json.loads((t5 / "config.json").read_text()).get("d_model")
        except ValueError as err:
            raise ConfigError(f"text.path={cfg.text.path!r}: config.json is not valid JSON ({err})") from None
        if not list(t5.glob("*.safetensors")):
            raise ConfigError(f"text.path={cfg.text.path!r} has no *.safetensors weights (cpdit never unpickles .bin)")
        want = checked_model_config(cfg).text_embed_dim if not cfg.model.pretrained else None
        if want is not None and width is not None and width != want:
            raise ConfigError(
                f"T5 at text.path has width {width}, model.text_embed_dim is {want}; set model.text_embed_dim={width}"
            )
    if cfg.model.pretrained:
        _need_dir("model.pretrained", cfg.model.pretrained, hint="a diffusers transformer directory")
        from cpdit.diffusers_io import weight_files

        try:
            weight_files(cfg.model.pretrained)
        except (ValueError, OSError) as err:
            raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: {err}") from None
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        _need_dir("checkpoint.resume", resume, "meta.json", hint="a complete checkpoint directory (step_XXXXXXXX)")
    if cfg.sample.checkpoint:
        _need_dir("sample.checkpoint", cfg.sample.checkpoint, "meta.json", hint="a complete checkpoint directory")
    if cfg.sample.prompts_file:
        prompts = Path(cfg.sample.prompts_file)
        if not prompts.is_file():
            raise ConfigError(f"sample.prompts_file={cfg.sample.prompts_file!r} does not exist")
        if not any(line.strip() for line in prompts.read_text(errors="replace").splitlines()):
            raise ConfigError(f"sample.prompts_file={cfg.sample.prompts_file!r} holds no prompt (one per line)")
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    for parent in (run_dir, *run_dir.parents):  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"train.output_dir={cfg.train.output_dir!r}: {str(parent)!r} is a file, so the run directory "
                    f"{str(run_dir)!r} cannot be created; choose another train.output_dir or train.run_name"
                )
            break
    if command == "sample" and not cfg.sample.checkpoint:
        from launch.job.checkpoint import find_resume

        if find_resume(run_dir / "checkpoints", "auto") is None:
            raise ConfigError(
                f"cpdit-launch sample: no complete checkpoint under {str(run_dir / 'checkpoints')!r}; train first "
                "(cpdit-launch train) or set sample.checkpoint=DIR"
            )
    if command == "sample" and not cfg.sample.prompts_file and not cfg.sample.prompts:
        raise ConfigError("no prompts: set sample.prompts or sample.prompts_file")


def _check_precomputed(cfg: JobConfig, dims: ParallelDims, command: str) -> None:
    """`cpdit-launch precompute`'s knobs; training from a precomputed directory: the directory, made for this job."""
    from launch.job.precomputed import INDEX, PrecomputedError, check_for_training, read_index, source_of

    m = job_model(cfg)
    image = isinstance(m, CogVideoXConfig) and m.image_conditioned
    try:
        if command == "train" and cfg.data.dataset == "precomputed":
            check_for_training(cfg, image, dims.dp)
        if command != "precompute":
            return
        out = cfg.precompute.output_dir
        if not out:
            raise ConfigError("cpdit-launch precompute needs precompute.output_dir (the directory it writes)")
        if cfg.data.dataset == "precomputed":
            raise ConfigError(
                "cpdit-launch precompute encodes a dataset of videos: data.dataset=precomputed is its output"
            )
        if cfg.first_stage.kind != "vae":
            raise ConfigError(
                "cpdit-launch precompute encodes clips through the VAE: set first_stage.kind=vae (pixel-space "
                "training reads the videos themselves)"
            )
        if image and cfg.train.image_noise != "clip":
            raise ConfigError(
                f"an image-to-video model's precompute keeps each clip's first frame noised once: set "
                f"train.image_noise=clip (is {cfg.train.image_noise!r}) here and when training from it"
            )
        root = Path(out)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"precompute.output_dir={out!r} is a file; choose a directory")
        if (root / INDEX).exists():
            old = read_index(root)
            if old.source != source_of(cfg, image) or old.shard_size != cfg.precompute.shard_size:
                raise ConfigError(
                    f"precompute.output_dir={out!r} holds the precompute of another config ({INDEX}'s source "
                    f"{old.source}, shard_size {old.shard_size}); choose another precompute.output_dir or delete it"
                )
    except PrecomputedError as err:
        raise ConfigError(str(err)) from None


def preflight(cfg: JobConfig, world_size: int, command: str = "train") -> ParallelDims:
    """Raise ConfigError/TopologyError for anything that would fail later; return the validated topology."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    if command in ("train", "sample", "precompute"):
        _check_shapes(cfg, dims, command)
        if cfg.data.buckets and command == "train":
            _check_buckets(cfg, dims, command)
        if cfg.data.buckets and command == "precompute":
            raise ConfigError(
                "data.buckets with cpdit-launch precompute: a precomputed directory holds clips of one shape "
                "(data.num_frames x data.height x data.width); remove data.buckets to precompute"
            )
        _check_files(cfg, command)
        _check_precomputed(cfg, dims, command)
    return dims
