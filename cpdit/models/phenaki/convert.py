# phenaki-pytorch `Attention`, `Transformer` and `ContinuousPositionBias` state dicts ->
# cpdit/models/phenaki/layers.py's Attention and PhenakiBlocks and cpdit/attn_bias.py's ContinuousPositionBias
# (`phenaki_attention_to_cpdit`, `phenaki_transformer_to_cpdit`, `phenaki_cpb_to_cpdit`), then `load_strict`
# (cpdit/models/seed_weights.py).
#
# Key table (phenaki-pytorch -> cpdit), layers.{i}.{0: PEG, 1: self-attention, 2: cross-attention, 3: feed-forward}
# -> blocks.{i}.{peg, attn, cross, ff}:
#   0.dsconv.{weight, bias}            -> peg.conv.{weight, bias}
#   {1, 2}.norm.gamma / context_norm.gamma -> attn.norm.weight / cross.context_norm.weight (beta: a zero buffer, dropped
#                                         unless the target has norm biases; the self-attention's context_norm is
#                                         never used by phenaki-pytorch and is dropped)
#   {1, 2}.to_kv.weight (2 inner, d)   -> to_k.weight, to_v.weight (halves)
#   {1, 2}.null_kv (h, 2n, d), keys and values interleaved -> null_kv (2, h, n, d); an empty one (n = 0) is dropped
#   {1, 2}.{to_q, to_out}.weight, q_scale, k_scale -> same names
#   3.0.{weight, bias} (LayerNorm), 3.1.weight (fused GEGLU, value first), 3.4.weight
#                                      -> ff.norm, ff.proj + ff.gate, ff.out
#   norm_out.gamma (the Transformer's final bias-free norm) -> norm_out.weight
#   ContinuousPositionBias net.{i}.0 (hidden layers), net.{last} -> net.{i}, out
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from cpdit.models.seed_weights import SeedKeyError, Tensor, convert_keys, fused_geglu


def _layer_norm(dst: str, gamma_or_beta: str, w: Tensor, norm_bias: bool, key: str) -> dict[str, Tensor]:
    if gamma_or_beta == "gamma":
        return {f"{dst}.weight": w}
    if norm_bias:
        return {f"{dst}.bias": w}
    if torch.count_nonzero(w):
        raise SeedKeyError(f"{key} is a non-zero LayerNorm bias; load it into a model with norm_bias=True")
    return {}


def _attention_rules(src: str, dst: str, cross: bool, norm_bias: bool):
    """Rules for the keys `src`* of one phenaki-pytorch Attention -> cpdit keys `dst`* (a prefix ending in '.' or
    empty)."""
    s = re.escape(src)

    def null_kv(m, w):
        if w.shape[1] == 0:
            return {}
        return {f"{dst}null_kv": torch.stack([w[:, 0::2], w[:, 1::2]]).clone()}  # (2, h, n, d)

    def to_kv(m, w):
        k, v = w.chunk(2, dim=0)
        return {f"{dst}to_k.weight": k.clone(), f"{dst}to_v.weight": v.clone()}

    def context_norm(m, w):
        return _layer_norm(f"{dst}context_norm", m[1], w, norm_bias, m[0]) if cross else {}

    return [
        (re.compile(rf"{s}norm\.(gamma|beta)"), lambda m, w: _layer_norm(f"{dst}norm", m[1], w, norm_bias, m[0])),
        (re.compile(rf"{s}context_norm\.(gamma|beta)"), context_norm),
        (re.compile(rf"{s}null_kv"), null_kv),
        (re.compile(rf"{s}to_kv\.weight"), to_kv),
        (re.compile(rf"{s}(to_q\.weight|to_out\.weight|q_scale|k_scale)"), lambda m, w: {f"{dst}{m[1]}": w}),
    ]


def phenaki_attention_to_cpdit(state: Mapping[str, Tensor], *, cross: bool, norm_bias: bool = False):
    """One phenaki-pytorch Attention -> cpdit/models/phenaki/layers.py's Attention (`cross`: a cross-attention)."""
    return convert_keys(state, _attention_rules("", "", cross, norm_bias), "phenaki-pytorch Attention")


def phenaki_transformer_to_cpdit(state: Mapping[str, Tensor], *, norm_bias: bool = False) -> dict[str, Tensor]:
    """A phenaki-pytorch Transformer -> `blocks.{i}.*` of PhenakiBlocks (the PhenakiDiT's names) and `norm_out`."""
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    rules = [(re.compile(r"norm_out\.(gamma|beta)"), lambda m, w: _layer_norm("norm_out", m[1], w, norm_bias, m[0]))]
    for i in layers:
        src, dst = f"layers.{i}.", f"blocks.{i}."
        rules += _attention_rules(f"{src}1.", f"{dst}attn.", False, norm_bias)
        rules += _attention_rules(f"{src}2.", f"{dst}cross.", True, norm_bias)
        rules += [
            (re.compile(rf"layers\.{i}\.0\.dsconv\.(weight|bias)"), lambda m, w, d=dst: {f"{d}peg.conv.{m[1]}": w}),
            (re.compile(rf"layers\.{i}\.3\.0\.(weight|bias)"), lambda m, w, d=dst: {f"{d}ff.norm.{m[1]}": w}),
            (re.compile(rf"layers\.{i}\.3\.1\.weight"), lambda m, w, d=dst: fused_geglu(f"{d}ff.weight", w)),
            (re.compile(rf"layers\.{i}\.3\.4\.weight"), lambda m, w, d=dst: {f"{d}ff.out.weight": w}),
        ]
    return convert_keys(state, rules, "phenaki-pytorch Transformer")


def phenaki_cpb_to_cpdit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """phenaki-pytorch's ContinuousPositionBias (net.{i}.0 hidden layers, net.{last} the output layer) ->
    cpdit/attn_bias.py's (net.{i}, out)."""
    last = max(int(m[1]) for k in state if (m := re.match(r"net\.(\d+)\.", k)))
    rules = [
        (re.compile(r"net\.(\d+)\.0\.(weight|bias)"), lambda m, w: {f"net.{m[1]}.{m[2]}": w}),
        (re.compile(rf"net\.{last}\.(weight|bias)"), lambda m, w: {f"out.{m[1]}": w}),
    ]
    return convert_keys(state, rules, "phenaki-pytorch ContinuousPositionBias")
