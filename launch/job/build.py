# Building what the job trains: the DiT of the configured family (cpdit/models/registry.py), the text encoder and the
# first stage, parallelized by parallel/parallelize.py and materialised and initialised (or loaded from diffusers
# weights), and the architecture record that checkpoints are checked against.
from __future__ import annotations

import json
from dataclasses import asdict

import torch
import torch.nn as nn

from cpdit.diffusers_io import load_diffusers_state_dict, weight_files
from cpdit.lora import add_lora
from cpdit.models.registry import FAMILIES, family_of, family_of_diffusers, family_of_preset
from cpdit.seeding import derive_seed
from cpdit.text import HashedTextEncoder
from launch.config import JobConfig
from parallel.dims import ParallelDims
from parallel.parallelize import Parallelized, parallelize_job
from parallel.state import assign_full, load_full_state_dict

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.mixed_precision -> compute dtype ("no": none)


class Trainable(nn.Module):
    """Everything the optimizer updates: the DiT and a trainable text encoder (one module for DCP state dicts).
    A frozen encoder (T5) is kept outside the module tree: it is neither optimized nor checkpointed."""

    def __init__(self, dit: nn.Module, text: nn.Module | None, frozen_text=None):
        super().__init__()
        self.dit, self.text = dit, text
        self.__dict__["frozen_text"] = frozen_text

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.text(captions) if self.text is not None else self.frozen_text(captions)


SHARED_KNOBS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "text_embed_dim")


def model_config(cfg: JobConfig):
    """The model's config: its family's preset with the job's `model:` overrides (the shared knobs and the family's
    own, cpdit/models/registry.py); a knob of another family is refused."""
    m = cfg.model
    family = family_of_preset(m.preset)
    for other in FAMILIES.values():
        stray = [k for k in other.job_knobs if k not in family.job_knobs and getattr(m, k) is not None]
        if stray:
            presets = " or ".join(other.presets)
            raise ValueError(
                f"model.{stray[0]} is a knob of the {other.title} family (model.preset={presets}), not of "
                f"model.preset={m.preset!r}; remove it or choose {presets}"
            )
    overrides = {k: getattr(m, k) for k in (*SHARED_KNOBS, *family.job_knobs)}
    # The diffusion model's channels are the first stage's: RGB in pixel space, the VAE's latent channels otherwise.
    channels = first_stage_config(cfg).latent_channels if cfg.first_stage.kind == "vae" else 3
    preset = family.presets[m.preset]
    ratio = preset.in_channels // (preset.out_channels or preset.in_channels)  # 2: [noisy | image] latents in
    overrides["in_channels"] = m.in_channels or ratio * channels
    overrides["out_channels"] = m.out_channels or overrides["in_channels"] // ratio
    return family.config(m.preset, overrides)


def pretrained_config(path: str):
    """The DiT config of a diffusers transformer directory (its config.json, through its family's converter)."""
    config = weight_files(path)[0]
    return family_of_diffusers(config).diffusers.config_from(config)


def build(cfg: JobConfig, dims: ParallelDims, mesh, device: torch.device) -> tuple[Trainable, Parallelized]:
    """The DiT of the model's family, the text encoder and the first stage, parallelized (parallel/parallelize.py)
    and materialised, with the layout handle the job uses (which ranks write, the first stage, local frames)."""
    if cfg.model.pretrained:  # the architecture comes from the checkpoint
        mcfg = pretrained_config(cfg.model.pretrained)
        family = family_of(mcfg)
    else:
        mcfg = model_config(cfg)
        family = family_of(mcfg)
    precomputed = cfg.data.dataset == "precomputed"  # the VAE and a frozen T5 stay out of memory (their work is done)
    frozen = build_frozen_text(cfg, device, mcfg.text_embed_dim) if not precomputed else None
    with torch.device("meta"):
        text = HashedTextEncoder(mcfg.text_embed_dim, cfg.train.text_max_length) if cfg.text.encoder != "t5" else None
        modules = Trainable(family.build(mcfg), text, frozen)
        if cfg.model.lora_rank:
            add_lora(modules.dit, cfg.model.lora_rank, cfg.model.lora_alpha)
    p = cfg.parallel
    par = parallelize_job(
        modules.dit,
        modules.text,
        dims,
        mesh,
        first_stage=posterior_stage(cfg) if precomputed else build_first_stage(cfg, device),
        first_stage_cp=cfg.first_stage.cp_size,
        activation_checkpointing="full" if cfg.model.gradient_checkpointing else "none",
        fsdp=p.fsdp,
        attention=p.attention,
        layout=p.layout,
        head_chunks=p.ring_head_chunks,
        param_dtype=AMP_DTYPES.get(cfg.train.mixed_precision),  # FSDP2 all-gathers bf16/fp16, reduces fp32
        compile=cfg.train.compile,
    )
    modules.to_empty(device=device)
    modules.dit.init_weights(cfg.train.seed, assign=assign_full)
    if modules.text is not None:
        modules.text.init_weights(cfg.train.seed, assign=assign_full)
    if cfg.model.pretrained:
        weights = family.diffusers.state_dict_from(load_diffusers_state_dict(cfg.model.pretrained)[1])
        load_full_state_dict(modules.dit, weights, strict=not cfg.model.lora_rank)  # adapters keep their init
    return modules, par


def architecture(cfg: JobConfig, mcfg) -> dict:
    """What a checkpoint's tensors depend on; resuming refuses a checkpoint whose architecture differs."""
    arch = {k: v for k, v in asdict(mcfg).items() if k != "extra"}
    arch.update(lora_rank=cfg.model.lora_rank, text_encoder=cfg.text.encoder)
    if cfg.text.encoder == "hashed":  # its position table has text_max_length rows
        arch["text_max_length"] = cfg.train.text_max_length
    return json.loads(json.dumps(arch))  # as it reads back from meta.json


def build_frozen_text(cfg: JobConfig, device: torch.device, width: int):
    """The frozen T5 of text.encoder=t5 on `device` (None for the trainable hashed encoder)."""
    if cfg.text.encoder != "t5":
        return None
    from cpdit.text import T5TextEncoder

    frozen = T5TextEncoder(cfg.text.path, cfg.train.text_max_length, cfg.text.cache_dir).to(device)
    if frozen.dim != width:
        raise ValueError(
            f"T5 width {frozen.dim} != model text_embed_dim {width}; set model.text_embed_dim={frozen.dim}"
        )
    return frozen


def posterior_stage(cfg: JobConfig):
    """The first stage of a run on precomputed posteriors: the latents' sampling without the VAE's weights."""
    from cpdit.first_stage import PixelStage, PosteriorStage

    if cfg.first_stage.kind == "pixel":
        return PixelStage()
    return PosteriorStage(first_stage_config(cfg), cfg.first_stage.scale_factor)


def first_stage_config(cfg: JobConfig):
    from cpdit.vae import VAEConfig

    f = cfg.first_stage
    if f.ckpt_path:
        from cpdit.vae.convert import config_from_diffusers

        return config_from_diffusers(weight_files(f.ckpt_path, subfolder="vae")[0])
    return VAEConfig.preset(f.preset)


def build_first_stage(cfg: JobConfig, device: torch.device):
    """The frozen first stage on one device: PixelStage, or the CogVideoX VAE (parallelize_job puts it on the cp
    group)."""
    from cpdit.first_stage import PixelStage, VAEStage

    f = cfg.first_stage
    if f.kind == "pixel":
        return PixelStage()
    from cpdit.vae import CogVideoXVAE

    if f.ckpt_path:
        from cpdit.vae.convert import load_vae

        vae = load_vae(f.ckpt_path)
    else:
        with torch.random.fork_rng():  # the same random VAE on every rank (PyTorch's default initialisation)
            torch.manual_seed(derive_seed(cfg.train.seed, "first stage init"))
            vae = CogVideoXVAE(first_stage_config(cfg))
    return VAEStage(vae.to(device), f.scale_factor, f.chunk_latents, diffusers_batches=f.semantics == "diffusers")
