# The Phenaki family: frame-causal cosine-similarity attention with ALiBi, a continuous position bias, null keys,
# a PEG and cross-attention to the text (phenaki-pytorch's Transformer), trained with a noise level per frame.
from cpdit.models.family import ModelFamily
from cpdit.models.phenaki.model import PHENAKI_PRESETS, PhenakiDiT, PhenakiDiTConfig

_LAYERS = {
    **{f"{a}.to_{x}": "colwise" for a in ("attn", "cross") for x in "qkv"},
    **{f"{a}.to_out": "rowwise" for a in ("attn", "cross")},
    "ff.proj": "colwise",
    "ff.gate": "colwise",
    "ff.out": "rowwise",
    "attn": "heads",  # null keys/values and the position-bias table by head; q/k scales shared by all heads
    "cross": "heads",
}

FAMILY = ModelFamily(
    name="phenaki",
    title="Phenaki",
    config_class=PhenakiDiTConfig,
    model_class=PhenakiDiT,
    presets=PHENAKI_PRESETS,
    tp_plan={"": "heads", **{f"blocks.*.{layer}": style for layer, style in _LAYERS.items()}},
    frame_causal=lambda config: config.frame_causal,
)

__all__ = ["FAMILY", "PHENAKI_PRESETS", "PhenakiDiT", "PhenakiDiTConfig"]
