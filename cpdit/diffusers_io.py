# Reading diffusers model directories without unpickling: the config and the safetensors files (sharded or not) of a
# model or of one component of a pipeline directory. The transformer and the VAE converters both read through it.
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cpdit.safe_paths import inside


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
    config = json.loads(inside(d, "config.json").read_text())  # no symlink, nothing resolving outside d
    index = sorted(d.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(inside(d, index[0].name).read_text())["weight_map"].values()))
        outside = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if outside:  # plain safetensors file names inside the directory, nothing else
            raise ValueError(f"{index[0]}: shards {outside} are not *.safetensors files inside {d}; refused")
        files = [d / s for s in shards]
    else:
        files = sorted(d.glob("*.safetensors"))
    files = [inside(d, f.name) for f in files]
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
