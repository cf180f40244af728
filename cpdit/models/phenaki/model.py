# A diffusion model of the Phenaki family (model.preset=phenaki-like): patchified latent frames, a per-frame timestep
# embedding (each frame may carry its own noise level: the frame-causal objective), `num_layers` PhenakiBlocks
# (cpdit/models/phenaki/layers.py) whose self-attention is frame-causal with ALiBi + a continuous position bias over (t,
# h, w) and null keys/values, cross-attention to the text, and a linear head back to patches.
#
# Frame-causal: the output of frame t depends only on frames <= t (attention, PEG and embeddings are all causal),
# so training with independent per-frame noise levels teaches the model to denoise a frame given its (cleaner)
# past, and sampling generates frames in order (cpdit/diffusion.py: sample_frames_in_order).
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cpdit.attn_bias import AttentionBias, ContinuousPositionBias
from cpdit.embeddings import timestep_embedding
from cpdit.models.patch import PatchVideoModel, patch_grid, patchify, unpatchify
from cpdit.models.phenaki.layers import PhenakiBlock
from cpdit.seams import AllHeads
from cpdit.sequence import LocalSequence, SequenceSeam


@dataclass(frozen=True)
class PhenakiDiTConfig:
    """The Phenaki-family model's architecture: PhenakiBlocks (phenaki-pytorch's Transformer layers) on patches."""

    in_channels: int = 3
    """Channels in (RGB in pixel space, the VAE's latent channels otherwise)."""
    out_channels: int | None = None
    """Channels predicted (None: in_channels)."""
    patch_size: int = 2
    """Spatial patch size."""
    text_embed_dim: int = 32
    """Width of the text encoder's output (the cross-attention context)."""
    num_attention_heads: int = 6
    """Attention heads. 6: not a power of two, so the ALiBi slopes take the seed's interleaved branch."""
    attention_head_dim: int = 8
    """Width of one head."""
    num_layers: int = 2
    """PhenakiBlocks."""
    self_attn_null_kv: int = 0
    """Null keys/values on the self-attention (phenaki-pytorch: none there; > 0 is cpdit's extension)."""
    cross_attn_null_kv: int = 2
    """Null keys/values on the cross-attention (phenaki-pytorch's `attn_num_null_kv`)."""
    attn_scale: float = 8.0
    """Temperature of the cosine-similarity attention."""
    alibi: bool = True
    """ALiBi in the causal self-attention, null keys included (phenaki-pytorch always has it when causal)."""
    continuous_position_bias: bool = True
    """An MLP of the (t, h, w) offsets gives every head an additive bias, shared by all layers."""
    cpb_dim: int = 32
    """Hidden width of the continuous-position-bias MLP."""
    cpb_layers: int = 2
    """Layers of the continuous-position-bias MLP."""
    peg: bool = True
    """A positional-encoding generator (depthwise 3D convolution) in front of each block."""
    peg_causal: bool = True
    """The PEG sees only past frames in time."""
    cross_attention: bool = True
    """Cross-attention to the text in every block."""
    ff_mult: float = 4.0
    """Feed-forward width multiplier (GEGLU inner width = ff_mult x 2/3 x hidden)."""
    time_embed_dim: int = 64
    """Width of the sinusoidal timestep embedding (one per frame)."""
    frame_causal: bool = True
    """Frame-causal self-attention (cpdit's video form of phenaki-pytorch's causal attention: ALiBi over frame
    distance), per-frame noise levels in training and frames generated in order when sampling. False: full
    attention without ALiBi, one noise level per clip."""
    norm_bias: bool = False
    """Trainable bias on the attention LayerNorms (phenaki-pytorch's are bias-free; True is an extension)."""
    family: str = "phenaki"
    """The family's name, recorded in checkpoints' architecture."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_hidden(self) -> int:
        return int(self.ff_mult * (2 / 3) * self.hidden_size)


class PhenakiDiT(PatchVideoModel):
    """forward(latents (B, T, C, H, W), text (B, L, text_dim), timesteps (B,) or per frame (B, T)) -> (B, T, C_out,
    H, W); optional text_mask (B, L) bool and frame_lengths (B,) (padding frames of shorter clips)."""

    def __init__(self, config: PhenakiDiTConfig):
        c = config
        super().__init__(c.in_channels, c.out_channels or c.in_channels, c.patch_size, c.hidden_size, c.time_embed_dim)
        self.config = c
        self.cpb = None
        if c.continuous_position_bias:
            self.cpb = ContinuousPositionBias(c.cpb_dim, c.num_attention_heads, 3, c.cpb_layers)
        context = c.text_embed_dim if c.cross_attention else None
        head = (c.num_attention_heads, c.attention_head_dim)
        layer = dict(
            context_dim=context,
            causal=c.frame_causal,
            alibi=c.alibi,
            self_null_kv=c.self_attn_null_kv,
            cross_null_kv=c.cross_attn_null_kv,
            peg=c.peg,
            peg_causal=c.peg_causal,
            ff_mult=c.ff_mult,
            scale=c.attn_scale,
            norm_bias=c.norm_bias,
        )
        self.blocks = nn.ModuleList(PhenakiBlock(c.hidden_size, *head, **layer) for _ in range(c.num_layers))
        self.sequence: SequenceSeam = LocalSequence()
        self.heads = AllHeads()  # parallel/ sets a tensor-parallel view (and the same on every attention)

    def special_value(self, name, shape, dtype, gen):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_scale", "k_scale"):
            return torch.ones(shape, dtype=dtype)
        if leaf == "null_kv":
            return torch.randn(shape, generator=gen).to(dtype)
        if name.startswith("cpb.") and leaf == "weight":  # the bias MLP starts as a real function of the offsets
            return (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(dtype)
        return None

    def bias_table(self, grid: tuple[int, int, int], dtype: torch.dtype, device: torch.device):
        """(H_local, 2T-1, 2h-1, 2w-1) continuous position bias shared by every layer, or None (ALiBi is added by
        each causal self-attention)."""
        if self.cpb is None:
            return None
        return self.heads.local(self.cpb(grid, dtype, device), 0)

    def forward(
        self,
        latents: torch.Tensor,
        text_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        return_local: bool = False,
        text_mask: torch.Tensor | None = None,
        frame_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.config
        B, T, C, H, W = latents.shape
        h, w = patch_grid(H, W, c.patch_size)
        seq = self.sequence.bind(T, h * w, 0)  # text enters through cross-attention, not the sequence
        dtype = self.patch_embed.weight.dtype
        x = patchify(seq.shard_frames(latents.to(dtype), dim=1), c.patch_size)  # (B, T_r, S, C*p*p)
        Tr = x.shape[1]
        steps = timesteps.expand(B, T) if timesteps.dim() == 2 else timesteps[:, None].expand(B, T)
        steps = steps.index_select(1, seq.frame_ids(latents.device))  # (B, T_r) this process's frames
        temb = self.time_embed(timestep_embedding(steps.reshape(-1), c.time_embed_dim).to(dtype)).view(B, Tr, 1, -1)
        x = (self.patch_embed(x) + temb).reshape(B, Tr * h * w, -1)  # (B, T_r * h * w, D)
        grid = (T, h, w)
        bias = AttentionBias(grid, self.bias_table(grid, dtype, x.device), None, None, frame_lengths)
        text = text_embeds.to(dtype)
        for block in self.blocks:
            x = block(x, seq, bias, text, text_mask, (h, w))
        out = self.proj_out(self.norm_out(x))  # (B, T_r * h * w, p*p*C_out)
        out = unpatchify(out.view(B, Tr, h * w, -1), c.patch_size, h, w, c.out_channels or c.in_channels)
        return out if return_local else seq.gather_frames(out, dim=1)  # (B, T | T_r, C_out, H, W)


PHENAKI_PRESETS: dict[str, PhenakiDiTConfig] = {
    # Phenaki's attention at a size the default job trains on CPU: 6 heads x 8, 2 blocks, every bias and mask on
    # (null keys/values on the self-attention too: an extension)
    "phenaki-like": PhenakiDiTConfig(self_attn_null_kv=2),
}
