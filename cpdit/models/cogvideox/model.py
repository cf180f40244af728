# CogVideoXDiT: the CogVideoX transformer (diffusers' CogVideoXTransformer3DModel / SAT's DiffusionTransformer) as
# single-device code. `self.sequence` is the seam parallel/ replaces: which frames are computed here and how
# attention over the joint sequence runs.
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpdit.embeddings import PatchEmbed, TimestepMLP, rope_3d, sincos_3d, timestep_embedding
from cpdit.models.cogvideox.blocks import Block
from cpdit.models.cogvideox.config import CogVideoXConfig
from cpdit.models.patch import unpatchify
from cpdit.seeding import param_generator
from cpdit.sequence import LocalSequence, SequenceSeam


class AdaLayerNormOut(nn.Module):
    """Final adaptive LayerNorm: (shift, scale) from the timestep embedding."""

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, temb):
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class CogVideoXDiT(nn.Module):
    """CogVideoX-style 3D full-attention diffusion transformer.

    forward(latents (B, T, C, H, W), text_embeds (B, L, text_dim), timesteps (B,)) -> (B, T, C_out, H, W).
    """

    def __init__(self, config: CogVideoXConfig):
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        self.patch_embed = PatchEmbed(c.in_channels, d, c.patch_size, c.text_embed_dim)
        self.time_embed = TimestepMLP(d, c.time_embed_dim)
        self.blocks = nn.ModuleList(
            Block(
                d,
                c.num_attention_heads,
                c.attention_head_dim,
                c.time_embed_dim,
                c.ff_hidden,
                c.norm_eps,
                c.qk_norm_eps,
                c.attention_bias,
            )
            for _ in range(c.num_layers)
        )
        self.norm_final = nn.LayerNorm(d, eps=c.norm_eps)
        self.norm_out = AdaLayerNormOut(c.time_embed_dim, d, c.norm_eps)
        self.proj_out = nn.Linear(d, c.patch_size**2 * c.out_channels)
        self.sequence: SequenceSeam = LocalSequence()

    def initial_value(self, name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        """The initial full tensor of parameter `name`: xavier-uniform weights, zero biases, unit norm scales;
        adaLN modulations and the output projection start at zero (adaLN-zero). Seeded per name, so the value does
        not depend on the order of initialisation or on how the parameter is sharded."""
        from cpdit.lora import lora_initial_value

        lora = lora_initial_value(name, shape, dtype, seed)
        if lora is not None:
            return lora
        leaf = name.rsplit(".", 1)[-1]
        zero_init = (".norm1.linear.", ".norm2.linear.", "norm_out.linear.", "proj_out.")
        if any(z in "." + name for z in zero_init) or leaf == "bias":
            return torch.zeros(shape, dtype=dtype)
        if len(shape) == 1:  # LayerNorm scale
            return torch.ones(shape, dtype=dtype)
        gen = param_generator(seed, name)
        fan_in, fan_out = shape[1] * math.prod(shape[2:]), shape[0] * math.prod(shape[2:])
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen).to(dtype)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, assign: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Initialise every parameter from `initial_value`. `assign(param, full_value)` stores a full tensor into a
        parameter; parallel/ passes one that keeps only the local shard of a sharded parameter."""
        assign = assign or (lambda param, value: param.copy_(value.to(param.device)))
        for name, param in self.named_parameters():
            assign(param, self.initial_value(name, param.shape, param.dtype, seed))

    @classmethod
    def from_diffusers(cls, path, dtype: torch.dtype | None = None) -> CogVideoXDiT:
        """Load a diffusers CogVideoXTransformer3DModel directory (config.json + safetensors, sharded too)."""
        from cpdit.diffusers_io import load_diffusers_state_dict
        from cpdit.models.cogvideox.convert import config_from_diffusers, state_dict_from_diffusers

        config, sd = load_diffusers_state_dict(path)
        model = cls(config_from_diffusers(config))
        model.load_state_dict(state_dict_from_diffusers(sd), strict=True)
        return model.to(dtype) if dtype is not None else model

    def forward(
        self, latents: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor, *, return_local: bool = False
    ) -> torch.Tensor:
        """Args:
        latents: (B, T, C, H, W) noisy latents (full video; identical on the ranks of one cp x tp group).
        text_embeds: (B, L, text_dim).
        timesteps: (B,).
        return_local: return only this process's frames (B, T_local, C_out, H, W) (for the training loss).
        """
        c = self.config
        B, T, C, H, W = latents.shape
        p = c.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height {H} and width {W} must be divisible by patch_size={p}")
        if C != c.in_channels:
            raise ValueError(f"latents have {C} channels, the model expects in_channels={c.in_channels}")
        h, w = H // p, W // p
        L = text_embeds.shape[1]
        seq = self.sequence.bind(T, h * w, L)
        dtype = self.patch_embed.proj.weight.dtype
        temb = self.time_embed(timestep_embedding(timesteps, c.hidden_size, c.flip_sin_to_cos, c.freq_shift).to(dtype))
        local = seq.shard_frames(latents.to(dtype), dim=1)  # (B, T_local, C, H, W)
        frame_ids = seq.frame_ids(latents.device)
        video = self.patch_embed.video(local)  # (B, T_local * h * w, hidden)
        text = self.patch_embed.text_proj(text_embeds.to(dtype))  # (B, L, hidden)
        rope = None
        if c.pos_embedding == "sincos":
            pos = sincos_3d(
                frame_ids, h, w, c.hidden_size, c.spatial_interpolation_scale, c.temporal_interpolation_scale
            )
            video = video + pos.to(dtype)
        else:
            rope = rope_3d(frame_ids, h, w, c.attention_head_dim, c.sample_height // p, c.sample_width // p)
        for block in self.blocks:
            video, text = block(video, text, temb, seq, rope)
        video = self.proj_out(self.norm_out(self.norm_final(video), temb))  # (B, T_local*h*w, p*p*C_out)
        out = unpatchify(
            video.view(B, -1, h * w, video.shape[-1]), p, h, w, c.out_channels
        )  # (B, T_local, C_out, H, W)
        return out if return_local else seq.gather_frames(out, dim=1)


CPDiT = CogVideoXDiT  # the name before the model families; kept as an alias for one release
