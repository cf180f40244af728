# Export of trained DiT weights: one safetensors file in cpdit's layout, and a diffusers directory
# (config.json + diffusion_pytorch_model.safetensors) that CogVideoXTransformer3DModel.from_pretrained reads.
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cpdit.convert import config_to_diffusers, state_dict_to_diffusers
from parallel.state import full_tensor


def export_model(model: torch.nn.Module, ema: dict | None, out: Path, rank: int) -> None:
    """Collective (gathers full tensors); rank 0 writes. Exports the EMA weights when there are some."""
    source = ema if ema is not None else dict(model.named_parameters())
    full = {n: full_tensor(t.detach()).cpu().contiguous() for n, t in source.items()}
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    save_file(full, str(out / "model.safetensors"))
    d = out / "diffusers"
    d.mkdir(exist_ok=True)
    save_file(state_dict_to_diffusers(full), str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text(json.dumps(config_to_diffusers(model.config), indent=1))
