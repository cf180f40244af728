# Configuration of the CogVideoX causal 3D VAE (diffusers' AutoencoderKLCogVideoX field names), with presets.
from __future__ import annotations

from dataclasses import dataclass, field

from cpdit import first_stage


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    """Width of each resolution level; len - 1 spatial 2x down/up-samplings."""
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    """2**k: the first k levels also halve (encoder) / double (decoder) time, the first frame kept apart."""
    scaling_factor: float = 1.15258426
    """Latents are multiplied by this before the diffusion model (and divided before decoding)."""
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry")
        levels = self.temporal_compression_ratio.bit_length() - 1
        if 2**levels != self.temporal_compression_ratio or levels >= len(self.block_out_channels):
            raise ValueError(
                f"temporal_compression_ratio={self.temporal_compression_ratio} must be a power of two below "
                f"2**{len(self.block_out_channels)}"
            )

    @property
    def time_levels(self) -> int:
        return self.temporal_compression_ratio.bit_length() - 1

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_frames(self, frames: int) -> int:
        """CogVideoX's frame rule: 1 + 4k pixel frames <-> 1 + k latent frames (49 <-> 13)."""
        r = self.temporal_compression_ratio
        if frames < 1 or (frames - 1) % r:
            raise ValueError(f"{frames} frames: the VAE needs 1 + {r}k frames (e.g. {1 + 12 * r})")
        return first_stage.latent_frames(frames, r)

    @classmethod
    def preset(cls, name: str, **overrides) -> VAEConfig:
        from cpdit.models.preset import from_preset

        return from_preset(VAE_PRESETS, "VAE", name, overrides)


VAE_PRESETS: dict[str, VAEConfig] = {
    "cogvideox": VAEConfig(),  # CogVideoX-2B/5B: 8x spatial, 4x temporal, 16 latent channels
    "tiny": VAEConfig(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4),
}
