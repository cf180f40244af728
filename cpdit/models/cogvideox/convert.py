# diffusers <-> cpdit: config and state-dict conversion for CogVideoXTransformer3DModel checkpoints (files are read
# by cpdit/diffusers_io.py; weights never go through pickle).
from __future__ import annotations

import re

import torch

from cpdit.models.cogvideox.config import CogVideoXConfig

# (cpdit pattern, diffusers pattern); {i} is a block index.
_KEYS = [
    ("patch_embed.proj.", "patch_embed.proj."),
    ("patch_embed.text_proj.", "patch_embed.text_proj."),
    ("time_embed.fc1.", "time_embedding.linear_1."),
    ("time_embed.fc2.", "time_embedding.linear_2."),
    ("ofs_embed.fc1.", "ofs_embedding.linear_1."),
    ("ofs_embed.fc2.", "ofs_embedding.linear_2."),
    ("patch_embed.pos_embedding", "patch_embed.pos_embedding"),  # learned table: (rows, D) here, (1, rows, D) there
    ("blocks.{i}.norm1.", "transformer_blocks.{i}.norm1."),
    ("blocks.{i}.norm2.", "transformer_blocks.{i}.norm2."),
    ("blocks.{i}.attn.to_q.", "transformer_blocks.{i}.attn1.to_q."),
    ("blocks.{i}.attn.to_k.", "transformer_blocks.{i}.attn1.to_k."),
    ("blocks.{i}.attn.to_v.", "transformer_blocks.{i}.attn1.to_v."),
    ("blocks.{i}.attn.norm_q.", "transformer_blocks.{i}.attn1.norm_q."),
    ("blocks.{i}.attn.norm_k.", "transformer_blocks.{i}.attn1.norm_k."),
    ("blocks.{i}.attn.to_out.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.ff.proj_in.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("blocks.{i}.ff.proj_out.", "transformer_blocks.{i}.ff.net.2."),
    ("norm_final.", "norm_final."),
    ("norm_out.linear.", "norm_out.linear."),
    ("norm_out.norm.", "norm_out.norm."),
    ("proj_out.", "proj_out."),
]
_TABLE = "patch_embed.pos_embedding"  # diffusers saves it only when learned (a sin-cos one is not persistent)


def _compile(src: str) -> re.Pattern:
    return re.compile("^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)") + "(.*)$")


def _rename(sd: dict[str, torch.Tensor], pairs: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    compiled = [(_compile(a), b) for a, b in pairs]
    out = {}
    for key, value in sd.items():
        for pat, dst in compiled:
            m = pat.match(key)
            if m:
                groups = m.groups()
                name = dst.replace("{i}", groups[0]) + groups[-1] if "{i}" in dst else dst + groups[-1]
                out[name] = value
                break
        else:
            raise KeyError(f"{what}: unexpected key {key!r} (not a CogVideoX transformer weight)")
    return out


def state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _rename(sd, [(b, a) for a, b in _KEYS], "diffusers state dict")
    if _TABLE in out:
        out[_TABLE] = out[_TABLE][0]  # (1, rows, D) -> (rows, D): FSDP shards the rows
    return out


def state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _rename(sd, _KEYS, "cpdit state dict")
    if _TABLE in out:
        out[_TABLE] = out[_TABLE][None]
    return out


# Config fields that mean the same in diffusers' CogVideoXTransformer3DModel and CogVideoXConfig.
_SHARED_FIELDS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "time_embed_dim",
    "text_embed_dim",
    "patch_size",
    "flip_sin_to_cos",
    "freq_shift",
    "attention_bias",
    "norm_eps",
    "sample_height",
    "sample_width",
    "sample_frames",
    "temporal_compression_ratio",
    "max_text_seq_length",
    "spatial_interpolation_scale",
    "temporal_interpolation_scale",
    "use_learned_positional_embeddings",  # CogVideoX-5B-I2V
    "patch_size_t",  # CogVideoX 1.5
    "ofs_embed_dim",  # CogVideoX1.5-5B-I2V
)


def config_from_diffusers(cfg: dict) -> CogVideoXConfig:
    """CogVideoXConfig from a diffusers CogVideoXTransformer3DModel config.json dict."""
    if not cfg.get("patch_bias", True) and cfg.get("patch_size_t") is None:
        raise ValueError(
            "patch_bias=False with a per-frame Conv2d patch embedding is not supported (no such checkpoint)"
        )
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"activation_fn={cfg['activation_fn']!r} unsupported (CogVideoX uses gelu-approximate)")
    if not cfg.get("norm_elementwise_affine", True):
        raise ValueError("norm_elementwise_affine=False is not supported")
    kwargs = {n: cfg[n] for n in _SHARED_FIELDS if n in cfg and cfg[n] is not None}  # None: the default
    kwargs["pos_embedding"] = "rope" if cfg.get("use_rotary_positional_embeddings") else "sincos"
    return CogVideoXConfig(**kwargs)


def config_to_diffusers(config: CogVideoXConfig) -> dict:
    """A diffusers CogVideoXTransformer3DModel config.json dict for `config`."""
    out = {n: getattr(config, n) for n in _SHARED_FIELDS}
    out.update(
        _class_name="CogVideoXTransformer3DModel",
        use_rotary_positional_embeddings=config.pos_embedding == "rope",
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        norm_elementwise_affine=True,
        dropout=0.0,
        patch_bias=config.patch_size_t is None,  # 1.5's Linear patch embedding has a bias whatever this says
    )
    return out
