# A diffusion model of the factorized spatial/temporal family (model.preset=svd-like): patchified latent frames,
# a timestep embedding added to every token, `depth` SpatialVideoTransformer stages (cpdit/factorized.py) with
# cross-attention to the text, and a linear head back to patches. Same interface and seams as CPDiT, so the job,
# parallelize (context parallelism by switching the sharded axis, FSDP) and checkpoints treat it alike.
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from cpdit.context import LocalContext, SequenceContext
from cpdit.embeddings import timestep_embedding
from cpdit.factorized import FactorizedConfig, SpatialVideoTransformer


@dataclass(frozen=True)
class FactorizedDiTConfig:
    in_channels: int = 3
    out_channels: int | None = None
    patch_size: int = 2
    text_embed_dim: int = 32
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    num_layers: int = 2
    """SpatialVideoTransformer stages."""
    time_depth: int = 1
    merge_strategy: str = "learned_with_images"
    merge_factor: float = 0.5
    use_spatial_context: bool = True
    disable_temporal_crossattention: bool = False
    ff_in: bool = False
    time_embed_dim: int = 64
    norm_groups: int = 8
    family: str = "factorized"

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def stage(self) -> FactorizedConfig:
        return FactorizedConfig(
            in_channels=self.hidden_size,
            num_heads=self.num_attention_heads,
            head_dim=self.attention_head_dim,
            depth=1,
            time_depth=self.time_depth,
            context_dim=self.text_embed_dim,
            merge_strategy=self.merge_strategy,
            merge_factor=self.merge_factor,
            use_spatial_context=self.use_spatial_context,
            disable_temporal_crossattention=self.disable_temporal_crossattention,
            ff_in=self.ff_in,
            norm_groups=self.norm_groups,
        )


class FactorizedDiT(nn.Module):
    """forward(latents (B, T, C, H, W), text (B, L, text_dim), timesteps (B,)) -> (B, T, C_out, H, W)."""

    def __init__(self, config: FactorizedDiTConfig):
        super().__init__()
        self.config = c = config
        d, p = c.hidden_size, c.patch_size
        self.patch_embed = nn.Linear(c.in_channels * p * p, d)
        self.time_embed = nn.Sequential(nn.Linear(c.time_embed_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(SpatialVideoTransformer(c.stage()) for _ in range(c.num_layers))
        self.norm_out = nn.LayerNorm(d)
        self.proj_out = nn.Linear(d, p * p * (c.out_channels or c.in_channels))
        self.context: SequenceContext = LocalContext()
        self.gradient_checkpointing = 0

    def initial_value(self, name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Deterministic full value of parameter `name` (identical on every rank)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name.rsplit(".", 2)[-2] and leaf == "weight":
            return torch.ones(shape, dtype=dtype)
        if leaf == "bias":
            return torch.zeros(shape, dtype=dtype)
        if name.endswith("mix_factor"):
            return torch.full(shape, self.config.merge_factor, dtype=dtype)
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, assign: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        assign = assign or (lambda param, value: param.copy_(value.to(param.device)))
        for name, param in self.named_parameters():
            assign(param, self.initial_value(name, param.shape, param.dtype, seed))

    def forward(
        self, latents: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor, *, return_local: bool = False
    ) -> torch.Tensor:
        c = self.config
        B, T, C, H, W = latents.shape
        p = c.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height {H} and width {W} must be divisible by patch_size={p}")
        h, w = H // p, W // p
        seq = self.context.bind(T, h * w, text_embeds.shape[1])
        dtype = self.patch_embed.weight.dtype
        x = seq.shard_frames(latents.to(dtype), dim=1)  # (B, T_r, C, H, W)
        Tr = x.shape[1]
        x = x.reshape(B, Tr, C, h, p, w, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, Tr, h * w, C * p * p)
        temb = self.time_embed(timestep_embedding(timesteps, c.time_embed_dim).to(dtype))  # (B, D)
        x = self.patch_embed(x) + temb[:, None, None]  # (B, T_r, S, D)
        axes = seq.axes(h * w)
        text = text_embeds.to(dtype)
        every = int(self.gradient_checkpointing)
        for i, block in enumerate(self.blocks):
            if every and i % every == 0 and torch.is_grad_enabled():  # recompute the stage in the backward
                x = checkpoint(block, x, text, None, axes, use_reentrant=False)
            else:
                x = block(x, text, None, axes)
        out = self.proj_out(self.norm_out(x))  # (B, T_r, S, p*p*C_out)
        Co = c.out_channels or c.in_channels
        out = out.reshape(B, Tr, h, w, Co, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Tr, Co, H, W)
        return out if return_local else seq.gather_frames(out, dim=1)


FACTORIZED_PRESETS: dict[str, FactorizedDiTConfig] = {
    # SVD's SpatialVideoTransformer knobs at a size the default job trains on CPU: 4 heads x 16, 2 stages
    "svd-like": FactorizedDiTConfig(),
}
