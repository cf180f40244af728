# Building what the job trains: the parallelized CPDiT and the text encoder, materialised and initialised (or
# loaded from diffusers weights), and the architecture record that checkpoints are checked against.
from __future__ import annotations

import json
from dataclasses import asdict

import torch
import torch.nn as nn

from cpdit import CPDiT, CPDiTConfig
from cpdit.config import PRESETS, from_preset
from cpdit.factorized_dit import FACTORIZED_PRESETS, FactorizedDiT, FactorizedDiTConfig
from cpdit.lora import add_lora
from cpdit.phenaki_dit import PHENAKI_PRESETS, PhenakiDiT, PhenakiDiTConfig
from cpdit.text import HashedTextEncoder
from launch.config import JobConfig
from parallel.dims import ParallelDims
from parallel.fsdp import apply_grad_allreduce, shard_module
from parallel.parallelize import parallelize
from parallel.state import assign_full, load_full_state_dict


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


def model_config(cfg: JobConfig) -> CPDiTConfig | FactorizedDiTConfig | PhenakiDiTConfig:
    m = cfg.model
    overrides = dict(
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        attention_head_dim=m.attention_head_dim,
        patch_size=m.patch_size,
        text_embed_dim=m.text_embed_dim,
        pos_embedding=m.pos_embedding,
    )
    # The diffusion model's channels are the first stage's: RGB in pixel space, the VAE's latent channels otherwise.
    channels = first_stage_config(cfg).latent_channels if cfg.first_stage.kind == "vae" else 3
    overrides["in_channels"] = m.in_channels or channels
    overrides["out_channels"] = m.out_channels or overrides["in_channels"]
    svd_only = ("merge_strategy", "merge_factor", "temporal_blocks", "use_spatial_context",
                "disable_temporal_crossattention")  # fmt: skip
    stray = [k for k in svd_only if getattr(m, k) is not None]
    if stray and m.preset not in FACTORIZED_PRESETS:
        raise ValueError(f"model.{stray[0]} is a knob of the factorized family (model.preset=svd-like), not of "
                         f"model.preset={m.preset!r}; remove it or choose svd-like")  # fmt: skip
    if m.preset in FACTORIZED_PRESETS:
        del overrides["pos_embedding"]
        for key in ("merge_strategy", "merge_factor", "temporal_blocks", "use_spatial_context"):
            overrides[key] = getattr(m, key)
        overrides["disable_temporal_crossattention"] = m.disable_temporal_crossattention
        return from_preset(FACTORIZED_PRESETS, "model", m.preset, overrides)
    if m.preset in PHENAKI_PRESETS:
        del overrides["pos_embedding"]  # positions come from ALiBi, the continuous position bias and the PEG
        return from_preset(PHENAKI_PRESETS, "model", m.preset, overrides)
    if m.preset not in PRESETS:
        known = ", ".join([*PRESETS, *FACTORIZED_PRESETS, *PHENAKI_PRESETS])
        raise ValueError(f"model preset {m.preset!r} is unknown; choose one of {known}")
    return CPDiTConfig.preset(m.preset, **overrides)


def model_class(mcfg):
    if isinstance(mcfg, PhenakiDiTConfig):
        return PhenakiDiT
    return FactorizedDiT if isinstance(mcfg, FactorizedDiTConfig) else CPDiT


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
        modules = Trainable(model_class(mcfg)(mcfg), text, frozen)
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
        head_chunks=p.ring_head_chunks,
    )
    # The text encoder's gradients reduce like the model's (parallel/fsdp.py); they pass through the model's
    # output-gradient scaling, so FSDP's plain average gives the same sum over cp / mean over dp.
    if modules.text is not None and p.fsdp and (dims.size("dp_shard_cp") > 1 or dims.dp_replicate > 1):
        shard_module(modules.text, mesh.fsdp_mesh(), torch.float32)
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


def architecture(cfg: JobConfig, mcfg: CPDiTConfig) -> dict:
    """What a checkpoint's tensors depend on; resuming refuses a checkpoint whose architecture differs."""
    arch = {k: v for k, v in asdict(mcfg).items() if k != "extra"}
    arch.update(lora_rank=cfg.model.lora_rank, text_encoder=cfg.text.encoder)
    if cfg.text.encoder == "hashed":  # its position table has text_max_length rows
        arch["text_max_length"] = cfg.train.text_max_length
    return json.loads(json.dumps(arch))  # as it reads back from meta.json


def first_stage_config(cfg: JobConfig):
    from cpdit.vae import VAEConfig

    f = cfg.first_stage
    if f.ckpt_path:
        from cpdit.convert import load_diffusers_state_dict
        from cpdit.vae.convert import config_from_diffusers

        return config_from_diffusers(load_diffusers_state_dict(f.ckpt_path, subfolder="vae")[0])
    return VAEConfig.preset(f.preset)


def build_first_stage(cfg: JobConfig, dims: ParallelDims, mesh, device: torch.device):
    """The frozen first stage: PixelStage, or the CogVideoX VAE (context-parallel over the model's cp group)."""
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
            torch.manual_seed(cfg.train.seed + 11)
            vae = CogVideoXVAE(first_stage_config(cfg))
    stage = VAEStage(vae.to(device), f.scale_factor, f.chunk_latents, diffusers_batches=f.semantics == "diffusers")
    cp = dims.cp if f.cp_size is None else f.cp_size
    if cp > 1:
        from parallel.vae_stage import ContextParallelVAE

        return ContextParallelVAE(stage, mesh.get_group("cp"))
    return stage
