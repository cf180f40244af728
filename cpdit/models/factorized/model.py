# A diffusion model of the factorized spatial/temporal family (model.preset=svd-like): patchified latent frames, a
# timestep embedding added to every token, `depth` SpatialVideoTransformer stages (cpdit/models/factorized/layers.py)
# with cross-attention to the text, and a linear head back to patches. Same interface and seams as CogVideoXDiT, so the
# job, parallelize (context parallelism by switching the sharded axis, FSDP) and checkpoints treat it alike.
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cpdit.embeddings import timestep_embedding
from cpdit.models.factorized.layers import FactorizedConfig, SpatialVideoTransformer
from cpdit.models.patch import PatchVideoModel, patch_grid, patchify, unpatchify
from cpdit.sequence import LocalSequence, SequenceSeam


@dataclass(frozen=True)
class FactorizedDiTConfig:
    """The factorized (SVD-style) model's architecture: a stack of sgm SpatialVideoTransformer stages on patches."""

    in_channels: int = 3
    """Channels in (RGB in pixel space, the VAE's latent channels otherwise)."""
    out_channels: int | None = None
    """Channels predicted (None: in_channels)."""
    patch_size: int = 2
    """Spatial patch size."""
    text_embed_dim: int = 32
    """Width of the text encoder's output (the cross-attention context)."""
    num_attention_heads: int = 4
    """Attention heads of every spatial and temporal block."""
    attention_head_dim: int = 16
    """Width of one head."""
    num_layers: int = 2
    """SpatialVideoTransformer stages."""
    temporal_blocks: int = 1
    """Temporal blocks after each spatial block (above 1: cpdit's extension, see FactorizedConfig)."""
    merge_strategy: str = "learned_with_images"
    """AlphaBlender of the spatial and temporal outputs: fixed, learned or learned_with_images."""
    merge_factor: float = 0.5
    """The fixed alpha, or the initial logit of a learned one."""
    use_spatial_context: bool = True
    """Temporal blocks cross-attend to the text as the spatial blocks do (sgm's use_spatial_context)."""
    disable_temporal_crossattention: bool = False
    """No cross-attention in the temporal blocks (their attn2 is then absent)."""
    ff_in: bool = True
    """A GEGLU feed-forward in front of each temporal block (sgm always has it; False is cpdit's extension)."""
    time_embed_dim: int = 64
    """Width of the sinusoidal timestep embedding."""
    norm_groups: int = 32
    """GroupNorm groups of each stage's input norm (sgm: 32; fewer for narrow models is cpdit's extension)."""
    family: str = "factorized"
    """The family's name, recorded in checkpoints' architecture."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.norm_groups:
            raise ValueError(
                f"num_attention_heads x attention_head_dim = {self.hidden_size} must be a multiple of "
                f"{self.norm_groups} (the GroupNorm groups of sgm's SpatialVideoTransformer); change "
                "model.num_attention_heads or model.attention_head_dim"
            )
        self.stage()  # the stage config validates its knobs (merge strategy, temporal blocks)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def stage(self) -> FactorizedConfig:
        return FactorizedConfig(
            in_channels=self.hidden_size,
            num_heads=self.num_attention_heads,
            head_dim=self.attention_head_dim,
            depth=1,
            temporal_blocks=self.temporal_blocks,
            context_dim=self.text_embed_dim,
            merge_strategy=self.merge_strategy,
            merge_factor=self.merge_factor,
            use_spatial_context=self.use_spatial_context,
            disable_temporal_crossattention=self.disable_temporal_crossattention,
            ff_in=self.ff_in,
            norm_groups=self.norm_groups,
        )


class FactorizedDiT(PatchVideoModel):
    """forward(latents (B, T, C, H, W), text (B, L, text_dim), timesteps (B,)) -> (B, T, C_out, H, W)."""

    def __init__(self, config: FactorizedDiTConfig):
        c = config
        super().__init__(c.in_channels, c.out_channels or c.in_channels, c.patch_size, c.hidden_size, c.time_embed_dim)
        self.config = c
        self.blocks = nn.ModuleList(SpatialVideoTransformer(c.stage()) for _ in range(c.num_layers))
        self.sequence: SequenceSeam = LocalSequence()

    def special_value(self, name, shape, dtype, gen):
        return torch.full(shape, self.config.merge_factor, dtype=dtype) if name.endswith("mix_factor") else None

    def forward(
        self, latents: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor, *, return_local: bool = False
    ) -> torch.Tensor:
        c = self.config
        B, T, C, H, W = latents.shape
        h, w = patch_grid(H, W, c.patch_size)
        seq = self.sequence.bind(T, h * w, text_embeds.shape[1])
        dtype = self.patch_embed.weight.dtype
        x = patchify(seq.shard_frames(latents.to(dtype), dim=1), c.patch_size)  # (B, T_r, S, C*p*p)
        temb = self.time_embed(timestep_embedding(timesteps, c.time_embed_dim).to(dtype))  # (B, D)
        x = self.patch_embed(x) + temb[:, None, None]  # (B, T_r, S, D)
        axes = seq.axes(h * w)
        text = text_embeds.to(dtype)
        for block in self.blocks:
            x = block(x, text, None, axes)
        out = self.proj_out(self.norm_out(x))  # (B, T_r, S, p*p*C_out)
        out = unpatchify(out, c.patch_size, h, w, c.out_channels or c.in_channels)  # (B, T_r, C_out, H, W)
        return out if return_local else seq.gather_frames(out, dim=1)


FACTORIZED_PRESETS: dict[str, FactorizedDiTConfig] = {
    # Stable Video Diffusion's SpatialVideoTransformer settings (learned_with_images blending, temporal
    # cross-attention to the text, ff_in) at a size the default job trains on CPU: 4 heads x 16, 2 stages
    "svd-like": FactorizedDiTConfig(),
}
