# The factorized family (SVD-style): per-frame spatial attention, then per-token temporal attention over frames
# (sgm's SpatialVideoTransformer), blended by an AlphaBlender. Context parallelism switches the sharded axis.
from cpdit.models.factorized.model import FACTORIZED_PRESETS, FactorizedDiT, FactorizedDiTConfig
from cpdit.models.family import ModelFamily

_BLOCKS = ("blocks.*.transformer_blocks.*", "blocks.*.time_stack.*.*")  # spatial blocks; temporal blocks per stack
_LAYERS = {
    **{f"{a}.to_{x}": "colwise" for a in ("attn1", "attn2") for x in "qkv"},
    **{f"{a}.to_out": "rowwise" for a in ("attn1", "attn2")},
    **{f"{ff}.{x}": "colwise" for ff in ("ff", "ff_in") for x in ("proj", "gate")},  # GEGLU value and gate
    **{f"{ff}.out": "rowwise" for ff in ("ff", "ff_in")},
}

FAMILY = ModelFamily(
    name="factorized",
    title="factorized",
    config_class=FactorizedDiTConfig,
    model_class=FactorizedDiT,
    presets=FACTORIZED_PRESETS,
    tp_plan={f"{block}.{layer}": style for block in _BLOCKS for layer, style in _LAYERS.items()},
    job_knobs=(
        "merge_strategy",
        "merge_factor",
        "temporal_blocks",
        "use_spatial_context",
        "disable_temporal_crossattention",
    ),  # fmt: skip
    summary="spatial attention per frame + temporal attention per token (sgm's SpatialVideoTransformer)",
)

__all__ = ["FAMILY", "FACTORIZED_PRESETS", "FactorizedDiT", "FactorizedDiTConfig"]
