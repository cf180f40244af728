# diffusers <-> cpdit: config and state-dict conversion for CogVideoXTransformer3DModel checkpoints, and loading
# config.json + *.safetensors (single file or sharded index). Weights never go through pickle.
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from cpdit.config import CPDiTConfig

# (cpdit pattern, diffusers pattern); {i} is a block index.
_KEYS = [
    ("patch_embed.proj.", "patch_embed.proj."),
    ("patch_embed.text_proj.", "patch_embed.text_proj."),
    ("time_embed.fc1.", "time_embedding.linear_1."),
    ("time_embed.fc2.", "time_embedding.linear_2."),
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
_IGNORED_DIFFUSERS = ("patch_embed.pos_embedding",)  # recomputed from ids


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
    sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_DIFFUSERS)}
    return _rename(sd, [(b, a) for a, b in _KEYS], "diffusers state dict")


def state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename(sd, _KEYS, "cpdit state dict")


# Config fields that mean the same in diffusers' CogVideoXTransformer3DModel and CPDiTConfig.
_SHARED_FIELDS = (
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "time_embed_dim",
    "text_embed_dim", "patch_size", "flip_sin_to_cos", "freq_shift", "attention_bias", "norm_eps", "sample_height",
    "sample_width", "sample_frames", "temporal_compression_ratio", "max_text_seq_length",
    "spatial_interpolation_scale", "temporal_interpolation_scale",
)  # fmt: skip

_UNSUPPORTED = {
    "patch_size_t": None,  # CogVideoX 1.5 temporal patching
    "ofs_embed_dim": None,  # 5B-I2V offset embedding
    "use_learned_positional_embeddings": False,
}


def config_from_diffusers(cfg: dict) -> CPDiTConfig:
    """CPDiTConfig from a diffusers CogVideoXTransformer3DModel config.json dict."""
    for key, ok in _UNSUPPORTED.items():
        if cfg.get(key, ok) != ok:
            raise ValueError(f"diffusers config {key}={cfg[key]!r} is not supported by cpdit (needs {ok!r})")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"activation_fn={cfg['activation_fn']!r} unsupported (CogVideoX uses gelu-approximate)")
    if not cfg.get("norm_elementwise_affine", True):
        raise ValueError("norm_elementwise_affine=False is not supported")
    kwargs = {n: cfg[n] for n in _SHARED_FIELDS if n in cfg and cfg[n] is not None}
    kwargs["pos_embedding"] = "rope" if cfg.get("use_rotary_positional_embeddings") else "sincos"
    return CPDiTConfig(**kwargs)


def config_to_diffusers(config: CPDiTConfig) -> dict:
    """A diffusers CogVideoXTransformer3DModel config.json dict for `config`."""
    out = {n: getattr(config, n) for n in _SHARED_FIELDS}
    out.update(
        _class_name="CogVideoXTransformer3DModel",
        use_rotary_positional_embeddings=config.pos_embedding == "rope",
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        norm_elementwise_affine=True,
        dropout=0.0,
        patch_bias=True,
    )
    return out


def _find_dir(path: Path, subfolder: str) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / subfolder / "config.json").is_file():  # a whole pipeline directory
        return path / subfolder
    raise FileNotFoundError(f"{path}: no config.json (expected a diffusers {subfolder} or pipeline directory)")


def weight_files(path: str | Path, subfolder: str = "transformer") -> tuple[dict, list[Path]]:
    """(config dict, the safetensors files to read) of a diffusers model or pipeline directory, without reading
    the weights; refuses pickle-only directories and index shards outside the directory."""
    d = _find_dir(Path(path), subfolder)
    config = json.loads((d / "config.json").read_text())
    index = sorted(d.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        outside = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if outside:  # plain safetensors file names inside the directory, nothing else
            raise ValueError(f"{index[0]}: shards {outside} are not *.safetensors files inside {d}; refused")
        files = [d / s for s in shards]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors weights (cpdit never unpickles .bin/.pt checkpoints)")
    return config, files


def load_diffusers_state_dict(path: str | Path, subfolder: str = "transformer") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, diffusers-keyed state dict) from a directory with config.json and safetensors weights."""
    config, files = weight_files(path, subfolder)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return config, sd
