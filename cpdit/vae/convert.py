# diffusers AutoencoderKLCogVideoX checkpoints <-> CogVideoXVAE. Module names are diffusers', so the state dict
# maps key for key; only the config is translated. Weights are safetensors only (never unpickled).
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from cpdit.diffusers_io import load_diffusers_state_dict
from cpdit.vae.config import VAEConfig
from cpdit.vae.model import CogVideoXVAE

_FIELDS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "layers_per_block",
    "norm_num_groups",
    "norm_eps",
    "scaling_factor",
    "use_quant_conv",
    "use_post_quant_conv",
)


def config_from_diffusers(cfg: dict) -> VAEConfig:
    kw = {k: cfg[k] for k in _FIELDS if k in cfg}
    kw["block_out_channels"] = tuple(cfg.get("block_out_channels", VAEConfig.block_out_channels))
    kw["temporal_compression_ratio"] = int(cfg.get("temporal_compression_ratio", 4))
    for key in ("down_block_types", "up_block_types"):
        if any(t not in ("CogVideoXDownBlock3D", "CogVideoXUpBlock3D") for t in cfg.get(key, ())):
            raise ValueError(f"{key}={cfg[key]} is not a CogVideoX VAE")
    return VAEConfig(**kw)


def config_to_diffusers(c: VAEConfig) -> dict:
    out = {k: getattr(c, k) for k in _FIELDS}
    levels = len(c.block_out_channels)
    out.update(
        _class_name="AutoencoderKLCogVideoX",
        block_out_channels=list(c.block_out_channels),
        temporal_compression_ratio=c.temporal_compression_ratio,
        down_block_types=["CogVideoXDownBlock3D"] * levels,
        up_block_types=["CogVideoXUpBlock3D"] * levels,
        act_fn="silu",
    )
    return out


def load_vae(path: str | Path) -> CogVideoXVAE:
    """A diffusers VAE directory (or a pipeline directory with vae/)."""
    cfg, sd = load_diffusers_state_dict(path, subfolder="vae")
    vae = CogVideoXVAE(config_from_diffusers(cfg))
    vae.load_state_dict(sd, strict=True)
    return vae


def save_vae(vae: CogVideoXVAE, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_diffusers(vae.config), indent=2))
    weights = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(weights, str(path / "diffusion_pytorch_model.safetensors"))
