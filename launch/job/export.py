# Export of trained DiT weights: one safetensors file in cpdit's layout, and a diffusers directory
# (config.json + diffusion_pytorch_model.safetensors) that CogVideoXTransformer3DModel.from_pretrained reads.
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from cpdit.lora import lora_state_dict_to_diffusers
from cpdit.models.registry import family_of
from parallel.state import full_tensor


def export_model(model: torch.nn.Module, ema: dict | None, out: Path, rank: int, lora: bool = False) -> None:
    """Collective; rank 0 writes (its write errors are raised on rank 0 only, after every collective)."""
    full = _gather(model, ema)
    if rank == 0:
        _write(model, full, out, lora)


def _gather(model: torch.nn.Module, ema: dict | None) -> dict[str, torch.Tensor]:
    """Collective: the full tensors on every rank. EMA weights replace the trained ones where kept."""
    source = {n: (ema[n] if ema is not None and n in ema else p) for n, p in model.named_parameters()}
    # Gathering FSDP x TP (strided) shards makes DTensor warn once per tensor that it uses two all-gathers; that
    # is expected for a one-off export, so keep the log readable.
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_log.level
    redistribute_log.setLevel(logging.ERROR)
    try:
        full = {n: full_tensor(t.detach()).cpu().contiguous() for n, t in source.items()}
    finally:
        redistribute_log.setLevel(level)
    return full


def _write(model: torch.nn.Module, full: dict[str, torch.Tensor], out: Path, lora: bool) -> None:
    """model.safetensors, and a diffusers directory for a family with a diffusers format. With LoRA: the base weights
    with adapters separately, and export/lora/ in diffusers' key layout."""
    out.mkdir(parents=True, exist_ok=True)
    adapters = {n: t for n, t in full.items() if ".lora." in n}
    full = {n: t for n, t in full.items() if ".lora." not in n}
    save_file(full, str(out / "model.safetensors"))
    if lora:
        (out / "lora").mkdir(exist_ok=True)
        save_file(adapters, str(out / "lora" / "adapters.safetensors"))
        save_file(lora_state_dict_to_diffusers(adapters), str(out / "lora" / "pytorch_lora_weights.safetensors"))
    fmt = family_of(model).diffusers
    if fmt is None:  # a family without a diffusers counterpart (factorized, Phenaki)
        return
    d = out / "diffusers"
    d.mkdir(exist_ok=True)
    save_file(fmt.state_dict_to(full), str(d / "diffusion_pytorch_model.safetensors"))
    (d / "config.json").write_text(json.dumps(fmt.config_to(model.config), indent=1))
