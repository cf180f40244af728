# Weights users already have, loaded into the factorized and Phenaki families by name:
# - sgm (Stable Video Diffusion) `SpatialVideoTransformer` state dicts -> cpdit/factorized.py's module of the same name
#   (`svd_to_cpdit`; pass the prefix of one transformer inside a UNet checkpoint, e.g.
#   "model.diffusion_model.input_blocks.1.1.");
# - phenaki-pytorch `Attention` and `Transformer` state dicts -> cpdit/phenaki.py's Attention and PhenakiBlocks
#   (`phenaki_attention_to_cpdit`, `phenaki_transformer_to_cpdit`).
# `load_strict(module, converted)` then refuses missing and unexpected keys with their lists. A key the converter
# does not know is refused with the list of such keys; nothing is guessed.
#
# Key table (sgm -> cpdit), for each of transformer_blocks.{i} and time_stack.{i} (-> time_stack.{i}.0):
#   proj_in / proj_out .weight (o, i, 1, 1) 1x1 conv or (o, i) linear  -> .weight (o, i)
#   {attn1, attn2}.to_out.0.{weight, bias}                             -> {attn1, attn2}.to_out.{weight, bias}
#   {ff, ff_in}.net.0.proj.{weight, bias} (fused GEGLU, value first)   -> {ff, ff_in}.proj and .gate (halves)
#   {ff, ff_in}.net.2.{weight, bias}                                   -> {ff, ff_in}.out
#   everything else (norm, norm{1,2,3}, norm_in, to_{q,k,v}, time_pos_embed, time_mixer.mix_factor) keeps its name.
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
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

Tensor = torch.Tensor


class SeedKeyError(ValueError):
    """A state dict has keys the converter or the target module does not know, or lacks keys the target needs."""


def _fused_geglu(dst: str, w: Tensor) -> dict[str, Tensor]:
    value, gate = w.chunk(2, dim=0)  # sgm and phenaki-pytorch: x, gate = proj(x).chunk(2, dim=-1)
    leaf = dst.rsplit(".", 1)
    return {f"{leaf[0]}.proj.{leaf[1]}": value.clone(), f"{leaf[0]}.gate.{leaf[1]}": gate.clone()}


def _svd_block(name: str) -> str:
    """transformer_blocks.i stays; sgm's single temporal block time_stack.i is cpdit's time_stack.i.0."""
    return re.sub(r"^time_stack\.(\d+)", r"time_stack.\1.0", name)


_SVD_RULES: list[tuple[re.Pattern, Callable[[re.Match, Tensor], dict[str, Tensor]]]] = [
    (re.compile(r"(proj_in|proj_out)\.weight"), lambda m, w: {m[0]: w.reshape(w.shape[0], w.shape[1])}),
    (re.compile(r"(proj_in|proj_out|norm)\.bias|norm\.weight|time_mixer\.mix_factor"), lambda m, w: {m[0]: w}),
    (re.compile(r"time_pos_embed\.[02]\.(weight|bias)"), lambda m, w: {m[0]: w}),
    (re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(attn[12])\.to_out\.0\.(weight|bias)"),
     lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.to_out.{m[3]}": w}),
    (re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(attn[12])\.(to_[qkv])\.weight"),
     lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.{m[3]}.weight": w}),
    (re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(ff|ff_in)\.net\.0\.proj\.(weight|bias)"),
     lambda m, w: _fused_geglu(f"{_svd_block(m[1])}.{m[2]}.{m[3]}", w)),
    (re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(ff|ff_in)\.net\.2\.(weight|bias)"),
     lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.out.{m[3]}": w}),
    (re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(norm[123]|norm_in)\.(weight|bias)"),
     lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.{m[3]}": w}),
]  # fmt: skip


def _convert(state: Mapping[str, Tensor], rules, what: str) -> dict[str, Tensor]:
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


def svd_to_cpdit(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The keys of one sgm SpatialVideoTransformer (those under `prefix`, which is stripped) -> cpdit's
    SpatialVideoTransformer keys."""
    mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not mine:
        raise SeedKeyError(f"no key starts with prefix {prefix!r}")
    return _convert(mine, _SVD_RULES, "sgm SpatialVideoTransformer")


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
    """One phenaki-pytorch Attention -> cpdit/phenaki.py's Attention (`cross`: it is a cross-attention)."""
    return _convert(state, _attention_rules("", "", cross, norm_bias), "phenaki-pytorch Attention")


def phenaki_transformer_to_cpdit(state: Mapping[str, Tensor], *, norm_bias: bool = False) -> dict[str, Tensor]:
    """A phenaki-pytorch Transformer -> `blocks.{i}.*` of PhenakiBlocks (the PhenakiDiT's names) and `norm_out`."""
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    rules = [(re.compile(r"norm_out\.(gamma|beta)"),
              lambda m, w: _layer_norm("norm_out", m[1], w, norm_bias, m[0]))]  # fmt: skip
    for i in layers:
        src, dst = f"layers.{i}.", f"blocks.{i}."
        rules += _attention_rules(f"{src}1.", f"{dst}attn.", False, norm_bias)
        rules += _attention_rules(f"{src}2.", f"{dst}cross.", True, norm_bias)
        rules += [
            (re.compile(rf"layers\.{i}\.0\.dsconv\.(weight|bias)"), lambda m, w, d=dst: {f"{d}peg.conv.{m[1]}": w}),
            (re.compile(rf"layers\.{i}\.3\.0\.(weight|bias)"), lambda m, w, d=dst: {f"{d}ff.norm.{m[1]}": w}),
            (re.compile(rf"layers\.{i}\.3\.1\.weight"), lambda m, w, d=dst: _fused_geglu(f"{d}ff.weight", w)),
            (re.compile(rf"layers\.{i}\.3\.4\.weight"), lambda m, w, d=dst: {f"{d}ff.out.weight": w}),
        ]
    return _convert(state, rules, "phenaki-pytorch Transformer")


def phenaki_cpb_to_cpdit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """phenaki-pytorch's ContinuousPositionBias (net.{i}.0 hidden layers, net.{last} the output layer) ->
    cpdit/attn_bias.py's (net.{i}, out)."""
    last = max(int(m[1]) for k in state if (m := re.match(r"net\.(\d+)\.", k)))
    rules = [
        (re.compile(r"net\.(\d+)\.0\.(weight|bias)"), lambda m, w: {f"net.{m[1]}.{m[2]}": w}),
        (re.compile(rf"net\.{last}\.(weight|bias)"), lambda m, w: {f"out.{m[1]}": w}),
    ]
    return _convert(state, rules, "phenaki-pytorch ContinuousPositionBias")


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
