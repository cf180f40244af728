# LoRA on the attention projections (q, k, v and the output), as CogVideoX fine-tuning uses it: y = W x + (alpha/r)
# B A x with A (r x in) random and B (out x r) zero, so training starts from the pretrained model. Keys follow
# peft/diffusers (`lora_A`, `lora_B`), so exports load with diffusers' `load_lora_weights`.
from __future__ import annotations

import math

import torch
import torch.nn as nn

from cpdit.seeding import param_generator

TARGETS = ("to_q", "to_k", "to_v", "to_out")


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> None:
    """Attach LoRA adapters to every block's attention (in place; works on the meta device) and freeze
    everything else."""
    if rank < 1:
        raise ValueError(f"model.lora_rank={rank} must be >= 1 to add LoRA")
    alpha = float(alpha or rank)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        attn = block.attn
        adapters = {}
        for name in TARGETS:
            layer = getattr(attn, name)  # adapters live where their layer does (dtype, device incl. meta)
            adapter = LoRA(layer.in_features, layer.out_features, rank, alpha)
            adapters[name] = adapter.to(device=layer.weight.device, dtype=layer.weight.dtype)
        attn.lora = nn.ModuleDict(adapters)


def lora_initial_value(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor | None:
    """Kaiming-uniform A, zero B; None for non-LoRA parameters."""
    if ".lora." not in name:
        return None
    if "lora_B" in name:
        return torch.zeros(shape, dtype=dtype)
    gen = param_generator(seed, name)
    bound = 1 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen).to(dtype)


def lora_state_dict_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cpdit `blocks.{i}.attn.lora.{target}.lora_{A,B}.weight` -> diffusers
    `transformer.transformer_blocks.{i}.attn1.{target}[.0].lora_{A,B}.weight`."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")  # blocks, i, attn, lora, target, lora_X, weight
        if len(parts) != 7 or parts[0] != "blocks" or parts[3] != "lora":
            raise KeyError(f"not a cpdit LoRA key: {key!r}")
        target = "to_out.0" if parts[4] == "to_out" else parts[4]
        out[f"transformer.transformer_blocks.{parts[1]}.attn1.{target}.{parts[5]}.weight"] = value
    return out
