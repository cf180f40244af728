# Architecture of a CogVideoX-style DiT. Field names follow diffusers' CogVideoXTransformer3DModel config.
from __future__ import annotations

from dataclasses import dataclass, field, replace

from cpdit.models.preset import from_preset


@dataclass(frozen=True)
class CogVideoXConfig:
    """The CogVideoX transformer's architecture; defaults are CogVideoX-2B's."""

    num_attention_heads: int = 30
    """Attention heads (hidden size = heads x head dim); tensor parallelism splits them."""
    attention_head_dim: int = 64
    """Width of one head."""
    in_channels: int = 16
    """Latent channels in (the VAE's latent channels; 3 in pixel space)."""
    out_channels: int = 16
    """Channels predicted (v-prediction: the same as in_channels)."""
    num_layers: int = 30
    """Transformer blocks."""
    time_embed_dim: int = 512
    """Width of the timestep embedding that drives adaLN."""
    text_embed_dim: int = 4096
    """Width of the text encoder's output (T5-XXL: 4096)."""
    patch_size: int = 2
    """Spatial patch size: frames of h x w latents become (h/p) x (w/p) tokens."""
    pos_embedding: str = "sincos"
    """"sincos" (3D sin-cos added to the tokens: CogVideoX-2B) or "rope" (3D RoPE on q and k: CogVideoX-5B)."""
    flip_sin_to_cos: bool = True
    """Timestep embedding as [cos, sin] (diffusers' flip_sin_to_cos)."""
    freq_shift: int = 0
    """Timestep embedding frequency shift (diffusers' freq_shift)."""
    attention_bias: bool = True
    """Bias on the q, k, v projections."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon of the blocks and the output norm."""
    qk_norm_eps: float = 1e-6
    """Epsilon of the per-head q/k LayerNorms."""
    ff_inner_dim: int | None = None
    """Feed-forward width (None: 4 x hidden)."""
    sample_height: int = 60
    """Reference latent height: sets the RoPE crop grid as CogVideoX does."""
    sample_width: int = 90
    """Reference latent width (RoPE crop grid)."""
    sample_frames: int = 49
    """Reference pixel frames (diffusers config field; positions come from the frame ids)."""
    temporal_compression_ratio: int = 4
    """The VAE's temporal compression (diffusers config field)."""
    max_text_seq_length: int = 226
    """Text tokens the model was trained with (diffusers config field; any length runs)."""
    spatial_interpolation_scale: float = 1.875
    """Sin-cos positions: spatial coordinates are divided by this."""
    temporal_interpolation_scale: float = 1.0
    """Sin-cos positions: frame coordinates are divided by this."""
    use_learned_positional_embeddings: bool = False
    """A trained (text + patches, hidden) position table added to the tokens, besides RoPE (CogVideoX-5B-I2V). It
    fixes the shape: max_text_seq_length text tokens, sample_height x sample_width latents, the latent frames of
    sample_frames."""
    patch_size_t: int | None = None
    """Temporal patch size: groups of this many latent frames become one patch-frame (CogVideoX 1.5: 2); None
    patches every frame on its own (CogVideoX 1.0)."""
    ofs_embed_dim: int | None = None
    """Width of the `ofs` embedding added to the timestep embedding (CogVideoX1.5-5B-I2V: 512); None: no ofs."""
    extra: dict = field(default_factory=dict, compare=False)
    """Free-form annotations of a config; not part of the architecture (checkpoints and equality ignore it)."""

    def __post_init__(self) -> None:
        if self.pos_embedding not in ("sincos", "rope"):
            raise ValueError(f"pos_embedding={self.pos_embedding!r} must be 'sincos' or 'rope'")
        if self.pos_embedding == "sincos" and self.hidden_size % 4:
            raise ValueError(f"sincos positions need hidden size % 4 == 0, got {self.hidden_size}")
        if self.pos_embedding == "rope" and self.attention_head_dim % 16:
            raise ValueError(
                f"3D RoPE needs attention_head_dim % 16 == 0 (even time/row/column shares), "
                f"got {self.attention_head_dim}"
            )
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("patch_size_t", "ofs_embed_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 or null")
        if self.use_learned_positional_embeddings and self.pos_embedding != "rope":
            raise ValueError(
                "use_learned_positional_embeddings=True comes with pos_embedding='rope' (CogVideoX-5B-I2V); "
                f"got pos_embedding={self.pos_embedding!r}"
            )
        if self.use_learned_positional_embeddings and self.patch_size_t is not None:
            raise ValueError(
                "use_learned_positional_embeddings=True has no table for patch_size_t (no such checkpoint)"
            )
        if self.patch_size_t is not None and self.pos_embedding != "rope":
            raise ValueError(f"patch_size_t={self.patch_size_t} comes with pos_embedding='rope' (CogVideoX 1.5)")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError(
                f"ofs_embed_dim={self.ofs_embed_dim} must equal time_embed_dim={self.time_embed_dim}: the ofs "
                "embedding is added to the timestep embedding"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_hidden(self) -> int:
        return self.ff_inner_dim or 4 * self.hidden_size

    @property
    def frames_per_patch(self) -> int:
        """Latent frames per patch-frame (1 for CogVideoX 1.0)."""
        return self.patch_size_t or 1

    @property
    def image_conditioned(self) -> bool:
        """Image-to-video: the input is [noisy latents | image latents] on channels (2 x the latent channels)."""
        return self.in_channels == 2 * self.out_channels

    @property
    def sample_latent_frames(self) -> int:
        """Latent frames of a sample_frames clip (the learned position table's frame count)."""
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    def learned_positions(self) -> int:
        """Rows of the learned position table: text tokens + patches of the sample shape (0 without one)."""
        if not self.use_learned_positional_embeddings:
            return 0
        p = self.patch_size
        return self.max_text_seq_length + self.sample_latent_frames * (self.sample_height // p) * (
            self.sample_width // p
        )

    @classmethod
    def preset(cls, name: str, **overrides) -> CogVideoXConfig:
        """A named architecture with optional field overrides (None values are ignored)."""
        return from_preset(PRESETS, "model", name, overrides)


_TINY = CogVideoXConfig(
    num_attention_heads=6,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    time_embed_dim=64,
    text_embed_dim=32,
    sample_height=8,
    sample_width=8,
    sample_frames=9,
    max_text_seq_length=16,
    spatial_interpolation_scale=1.0,
)

_FIVE_1_5 = CogVideoXConfig(
    num_attention_heads=48,
    num_layers=42,
    pos_embedding="rope",
    patch_size_t=2,
    sample_height=300,
    sample_width=300,
    sample_frames=81,
)

PRESETS: dict[str, CogVideoXConfig] = {
    # The tests': 6 heads (3 per rank at model_parallel_size=2) x 16, 2 blocks, 2x2 patches.
    "tiny": _TINY,
    # The default job: small enough to learn the synthetic clips in minutes on 2 CPU cores with 4 ranks, shaped
    # like the real model (full 3D attention over [text, frames], adaLN, sincos positions): tiny's 6 heads, 32 wide,
    # 4 blocks, 4x4 patches (16x16 frames -> 4x4 tokens).
    "demo": replace(_TINY, attention_head_dim=32, num_layers=4, patch_size=4, sample_height=16, sample_width=16),
    # CogVideoX-2B: hidden 1920 = 30 heads x 64, 30 layers, 3D sin-cos positions.
    "cogvideox-2b": CogVideoXConfig(),
    # CogVideoX-5B: hidden 3072 = 48 heads x 64, 42 layers, 3D RoPE.
    "cogvideox-5b": CogVideoXConfig(num_attention_heads=48, num_layers=42, pos_embedding="rope"),
    # CogVideoX-5B-I2V: the 5B with [noisy | image] latents in (32 channels) and a learned position table besides
    # RoPE, which fixes the shape to 49 frames of 60 x 90 latents and 226 text tokens.
    "cogvideox-5b-i2v": CogVideoXConfig(
        num_attention_heads=48,
        num_layers=42,
        pos_embedding="rope",
        in_channels=32,
        use_learned_positional_embeddings=True,
    ),
    # CogVideoX1.5-5B: 2 latent frames per patch-frame, RoPE on a sliced grid up to 150 x 150 patches, 81 frames.
    "cogvideox1.5-5b": _FIVE_1_5,
    # CogVideoX1.5-5B-I2V: 1.5 with image latents in and the ofs embedding.
    "cogvideox1.5-5b-i2v": replace(_FIVE_1_5, in_channels=32, ofs_embed_dim=512),
}

CPDiTConfig = CogVideoXConfig  # the name before the model families; kept as an alias for one release
