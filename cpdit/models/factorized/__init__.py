# The factorized family (SVD-style): per-frame spatial attention, then per-token temporal attention over frames
# (sgm's SpatialVideoTransformer), blended by an AlphaBlender. Context parallelism switches the sharded axis.
from cpdit.models.factorized.model import FACTORIZED_PRESETS, FactorizedDiT, FactorizedDiTConfig
from cpdit.models.family import ModelFamily

_ATTN = {
    **{f"{a}.to_{x}": "colwise" for a in ("attn1", "attn2") for x in "qkv"},
    **{f"{a}.to_out": "rowwise" for a in ("attn1", "attn2")},
}


def _ff(ff: str) -> dict[str, str]:  # GEGLU: value and gate by columns, the output by rows
    return {f"{ff}.proj": "colwise", f"{ff}.gate": "colwise", f"{ff}.out": "rowwise"}


_SPATIAL = {**_ATTN, **_ff("ff")}  # blocks.i.transformer_blocks.j
_TEMPORAL = {**_ATTN, **_ff("ff"), **_ff("ff_in")}  # blocks.i.time_stack.j.k (ff_in in front of each)

FAMILY = ModelFamily(
    name="factorized",
    title="factorized",
    config_class=FactorizedDiTConfig,
    model_class=FactorizedDiT,
    presets=FACTORIZED_PRESETS,
    tp_plan={
        **{f"blocks.*.transformer_blocks.*.{layer}": style for layer, style in _SPATIAL.items()},
        **{f"blocks.*.time_stack.*.*.{layer}": style for layer, style in _TEMPORAL.items()},
    },
    job_knobs=(
        "merge_strategy",
        "merge_factor",
        "temporal_blocks",
        "use_spatial_context",
        "disable_temporal_crossattention",
    ),
)

__all__ = ["FAMILY", "FACTORIZED_PRESETS", "FactorizedDiT", "FactorizedDiTConfig"]
