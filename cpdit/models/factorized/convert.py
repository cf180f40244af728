# sgm (Stable Video Diffusion) `SpatialVideoTransformer` state dicts -> cpdit/models/factorized/layers.py's module of
# the same name (`svd_to_cpdit`; pass the prefix of one transformer inside a UNet checkpoint, e.g.
# "model.diffusion_model.input_blocks.1.1."), then `load_strict` (cpdit/models/seed_weights.py).
#
# Key table (sgm -> cpdit), for each of transformer_blocks.{i} and time_stack.{i} (-> time_stack.{i}.0):
#   proj_in / proj_out .weight (o, i, 1, 1) 1x1 conv or (o, i) linear  -> .weight (o, i)
#   {attn1, attn2}.to_out.0.{weight, bias}                             -> {attn1, attn2}.to_out.{weight, bias}
#   {ff, ff_in}.net.0.proj.{weight, bias} (fused GEGLU, value first)   -> {ff, ff_in}.proj and .gate (halves)
#   {ff, ff_in}.net.2.{weight, bias}                                   -> {ff, ff_in}.out
#   everything else (norm, norm{1,2,3}, norm_in, to_{q,k,v}, time_pos_embed, time_mixer.mix_factor) keeps its name.
from __future__ import annotations

import re
from collections.abc import Mapping

from cpdit.models.seed_weights import Rule, SeedKeyError, Tensor, convert_keys, fused_geglu


def _svd_block(name: str) -> str:
    """transformer_blocks.i stays; sgm's single temporal block time_stack.i is cpdit's time_stack.i.0."""
    return re.sub(r"^time_stack\.(\d+)", r"time_stack.\1.0", name)


_SVD_RULES: list[Rule] = [
    (re.compile(r"(proj_in|proj_out)\.weight"), lambda m, w: {m[0]: w.reshape(w.shape[0], w.shape[1])}),
    (re.compile(r"(proj_in|proj_out|norm)\.bias|norm\.weight|time_mixer\.mix_factor"), lambda m, w: {m[0]: w}),
    (re.compile(r"time_pos_embed\.[02]\.(weight|bias)"), lambda m, w: {m[0]: w}),
    (
        re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(attn[12])\.to_out\.0\.(weight|bias)"),
        lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.to_out.{m[3]}": w},
    ),
    (
        re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(attn[12])\.(to_[qkv])\.weight"),
        lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.{m[3]}.weight": w},
    ),
    (
        re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(ff|ff_in)\.net\.0\.proj\.(weight|bias)"),
        lambda m, w: fused_geglu(f"{_svd_block(m[1])}.{m[2]}.{m[3]}", w),
    ),
    (
        re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(ff|ff_in)\.net\.2\.(weight|bias)"),
        lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.out.{m[3]}": w},
    ),
    (
        re.compile(r"((?:transformer_blocks|time_stack)\.\d+)\.(norm[123]|norm_in)\.(weight|bias)"),
        lambda m, w: {f"{_svd_block(m[1])}.{m[2]}.{m[3]}": w},
    ),
]


def svd_to_cpdit(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The keys of one sgm SpatialVideoTransformer (those under `prefix`, which is stripped) -> cpdit's
    SpatialVideoTransformer keys."""
    mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not mine:
        raise SeedKeyError(f"no key starts with prefix {prefix!r}")
    return convert_keys(mine, _SVD_RULES, "sgm SpatialVideoTransformer")
