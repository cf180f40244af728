# Weights users already have, loaded into the factorized and Phenaki families by name. The rules per family live in
# cpdit/models/factorized/convert.py (sgm's SpatialVideoTransformer) and cpdit/models/phenaki/convert.py
# (phenaki-pytorch's Attention, Transformer and ContinuousPositionBias); this file is what they share: the rule
# engine, which refuses any key no rule knows (nothing is guessed), the fused GEGLU split, and `load_strict`, which
# refuses missing and unexpected keys with their lists.
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

Tensor = torch.Tensor
Rule = tuple[re.Pattern, Callable[[re.Match, Tensor], dict[str, Tensor]]]


class SeedKeyError(ValueError):
    """A state dict has keys the converter or the target module does not know, or lacks keys the target needs."""


def fused_geglu(dst: str, w: Tensor) -> dict[str, Tensor]:
    value, gate = w.chunk(2, dim=0)  # sgm and phenaki-pytorch: x, gate = proj(x).chunk(2, dim=-1)
    leaf = dst.rsplit(".", 1)
    return {f"{leaf[0]}.proj.{leaf[1]}": value.clone(), f"{leaf[0]}.gate.{leaf[1]}": gate.clone()}


def convert_keys(state: Mapping[str, Tensor], rules: list[Rule], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, rule in rules:
            m = pattern.fullmatch(key)
            if m:
                out.update(rule(m, value))
                break
        else:
            unknown.append(key)
    if unknown:
        raise SeedKeyError(f"{what}: {len(unknown)} key(s) this converter does not know: {sorted(unknown)}")
    return out


def load_strict(module: nn.Module, converted: Mapping[str, Tensor]) -> None:
    """Load converted weights; every key of the module must be given and nothing else."""
    want = set(module.state_dict())
    missing, unexpected = sorted(want - set(converted)), sorted(set(converted) - want)
    if missing or unexpected:
        raise SeedKeyError(
            f"the converted weights do not fit {type(module).__name__}: missing {missing}, unexpected {unexpected} "
            "(check that the cpdit config matches the checkpoint's: heads, depth, ff_in, null keys, cross-attention)"
        )
    module.load_state_dict(dict(converted), strict=True)
