# Exponential moving average of the trainable parameters, kept with the parameters' own sharding.
from __future__ import annotations

import torch
import torch.nn as nn


def new_ema(model: nn.Module) -> dict[str, torch.Tensor]:
    """EMA copies of the trainable parameters (same sharding)."""
    return {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param for the parameters in `ema` (the trainable ones), shard by shard
    (EMA tensors share the parameters' sharding)."""
    for name, p in model.named_parameters():
        if name in ema:
            ema[name].lerp_(p.detach(), 1.0 - decay)
