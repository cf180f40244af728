# CogVideoXDiT: the CogVideoX transformer (diffusers' CogVideoXTransformer3DModel / SAT's DiffusionTransformer) as
# single-device code. `self.sequence` is the seam parallel/ replaces: which frames are computed here and how
# attention over the joint sequence runs.
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cpdit.embeddings import PatchEmbed, TimestepMLP, rope_3d, sincos_3d, timestep_embedding
from cpdit.models.cogvideox.blocks import Block
from cpdit.models.cogvideox.config import CogVideoXConfig
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
        self.patch_embed = PatchEmbed(
            c.in_channels,
            d,
            c.patch_size,
            c.text_embed_dim,
            patch_size_t=c.patch_size_t,
            learned_rows=c.learned_positions(),
        )
        self.time_embed = TimestepMLP(d, c.time_embed_dim)
        self.ofs_embed = TimestepMLP(c.ofs_embed_dim, c.ofs_embed_dim) if c.ofs_embed_dim else None
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
        self.proj_out = nn.Linear(d, c.frames_per_patch * c.patch_size**2 * c.out_channels)
        self.sequence: SequenceSeam = LocalSequence()

    @property
    def frames_per_patch(self) -> int:
        """Latent frames per patch-frame: context parallelism partitions groups of this many frames."""
        return self.config.frames_per_patch

    def initial_value(self, name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        """The initial full tensor of parameter `name`: xavier-uniform weights, zero biases, unit norm scales;
        adaLN modulations and the output projection start at zero (adaLN-zero). Seeded per name, so the value does
        not depend on the order of initialisation or on how the parameter is sharded."""
        from cpdit.lora import lora_initial_value

        lora = lora_initial_value(name, shape, dtype, seed)
        if lora is not None:
            return lora
        leaf = name.rsplit(".", 1)[-1]
        zero_init = (".norm1.linear.", ".norm2.linear.", "norm_out.linear.", "proj_out.", "patch_embed.pos_embedding")
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
        if dtype is not None:  # before loading: a float64 checkpoint keeps every digit
            model = model.to(dtype)
        model.load_state_dict(state_dict_from_diffusers(sd), strict=True)
        return model

    def forward(
        self,
        latents: torch.Tensor,
        text_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        ofs: float | torch.Tensor | None = None,
        return_local: bool = False,
    ) -> torch.Tensor:
        """Args:
        latents: (B, T, C, H, W) noisy latents (full video; identical on the ranks of one cp x tp group); for an
            image-conditioned model, [noisy latents | image latents] on channels (C = in_channels).
        text_embeds: (B, L, text_dim).
        timesteps: (B,).
        ofs: the `ofs` input of a model with ofs_embed_dim, a number or (B,) (None: DEFAULT_OFS).
        return_local: return only this process's frames (B, T_local, C_out, H, W) (for the training loss).
        """
        c = self.config
        B, T, C, H, W = latents.shape
        p, pt = c.patch_size, c.frames_per_patch
        if H % p or W % p:
            raise ValueError(f"latent height {H} and width {W} must be divisible by patch_size={p}")
        if C != c.in_channels:
            raise ValueError(f"latents have {C} channels, the model expects in_channels={c.in_channels}")
        if T % pt:
            raise ValueError(f"{T} latent frames do not group into patch_size_t={pt}: use a multiple of {pt}")
        h, w = H // p, W // p
        L = text_embeds.shape[1]
        if c.use_learned_positional_embeddings:
            check_learned_shape(c, T, H, W, L)
        seq = self.sequence.bind(T // pt, h * w, L)  # cp partitions patch-frames
        dtype = self.patch_embed.proj.weight.dtype
        temb = self.time_embed(timestep_embedding(timesteps, c.hidden_size, c.flip_sin_to_cos, c.freq_shift).to(dtype))
        if self.ofs_embed is not None:
            ofs = torch.as_tensor(DEFAULT_OFS if ofs is None else ofs, device=latents.device).reshape(-1)  # (1,)|(B,)
            ofs_emb = timestep_embedding(ofs, c.ofs_embed_dim, c.flip_sin_to_cos, c.freq_shift).to(dtype)
            temb = temb + self.ofs_embed(ofs_emb)
        elif ofs is not None:
            raise ValueError("ofs is an input of models with ofs_embed_dim (CogVideoX1.5-5B-I2V); this one has none")
        grouped = latents.to(dtype).unflatten(1, (T // pt, pt))  # (B, T/pt, pt, C, H, W)
        local = seq.shard_frames(grouped, dim=1).flatten(1, 2)  # (B, T_local, C, H, W), T_local = pt x patch-frames
        frame_ids = seq.frame_ids(latents.device)  # this rank's patch-frames
        video = self.patch_embed.video(local)  # (B, T_local/pt * h * w, hidden)
        text = self.patch_embed.text_proj(text_embeds.to(dtype))  # (B, L, hidden)
        rope = None
        if c.pos_embedding == "sincos":
            pos = sincos_3d(
                frame_ids, h, w, c.hidden_size, c.spatial_interpolation_scale, c.temporal_interpolation_scale
            )
            video = video + pos.to(dtype)
        else:
            grid = "crop" if c.patch_size_t is None else "slice"  # as diffusers' 1.0 / 1.5 pipelines
            rope = rope_3d(frame_ids, h, w, c.attention_head_dim, c.sample_height // p, c.sample_width // p, grid)
        if c.use_learned_positional_embeddings:  # rows [text | frame-major patches]; this rank's frames only
            table = self.patch_embed.pos_embedding  # (L + T * h * w, hidden)
            rows = L + (frame_ids[:, None] * (h * w) + torch.arange(h * w, device=latents.device)).flatten()
            video = video + table[rows].to(dtype)
            text = text + table[:L].to(dtype)
        for block in self.blocks:
            video, text = block(video, text, temb, seq, rope)
        video = self.proj_out(self.norm_out(self.norm_final(video), temb))  # (B, T_local/pt*h*w, pt*p*p*C_out)
        out = rearrange(
            video, "b (t h w) (c pt p1 p2) -> b (t pt) c (h p1) (w p2)", h=h, w=w, c=c.out_channels, pt=pt, p1=p, p2=p
        )  # (B, T_local, C_out, H, W)
        if return_local:
            return out
        return seq.gather_frames(out.unflatten(1, (-1, pt)), dim=1).flatten(1, 2)  # (B, T, C_out, H, W)


def check_learned_shape(c: CogVideoXConfig, frames: int, height: int, width: int, text_len: int) -> None:
    """A learned position table has rows for one shape only: the sample shape of the config."""
    want = (c.sample_latent_frames, c.sample_height, c.sample_width, c.max_text_seq_length)
    if (frames, height, width, text_len) != want:
        raise ValueError(
            f"the learned position table (use_learned_positional_embeddings) fits {want[0]} latent frames of "
            f"{want[1]} x {want[2]} latents and {want[3]} text tokens, got {frames} frames of {height} x {width} "
            f"and {text_len} text tokens"
        )


DEFAULT_OFS = 2.0  # the ofs value diffusers' CogVideoX 1.5 image-to-video pipeline passes


CPDiT = CogVideoXDiT  # the name before the model families; kept as an alias for one release
