# The CogVideoX family: full 3D attention over [text | frames] with adaLN (diffusers' CogVideoXTransformer3DModel).
from cpdit.models.cogvideox import convert
from cpdit.models.cogvideox.config import PRESETS, CogVideoXConfig, CPDiTConfig
from cpdit.models.cogvideox.model import CogVideoXDiT, CPDiT
from cpdit.models.family import DiffusersFormat, ModelFamily

_ATTN = {f"blocks.*.attn.to_{x}": "colwise" for x in "qkv"}
_LORA = {f"blocks.*.attn.lora.to_{x}.lora_B": "colwise" for x in "qkv"}  # adapters follow their layer

FAMILY = ModelFamily(
    name="cogvideox",
    title="CogVideoX",
    config_class=CogVideoXConfig,
    model_class=CogVideoXDiT,
    presets=PRESETS,
    tp_plan={
        **_ATTN,
        "blocks.*.attn.to_out": "rowwise",
        "blocks.*.ff.proj_in": "colwise",
        "blocks.*.ff.proj_out": "rowwise",
        **_LORA,
        "blocks.*.attn.lora.to_out.lora_A": "rowwise",
        "blocks.*.attn.norm_q": "shared_norm",  # one per-head-dim LayerNorm shared by all heads
        "blocks.*.attn.norm_k": "shared_norm",
    },
    job_knobs=("pos_embedding", "patch_size_t"),
    lora=True,
    planned=True,
    diffusers=DiffusersFormat(
        "CogVideoXTransformer3DModel",
        convert.config_from_diffusers,
        convert.config_to_diffusers,
        convert.state_dict_from_diffusers,
        convert.state_dict_to_diffusers,
    ),
)

__all__ = ["FAMILY", "PRESETS", "CogVideoXConfig", "CogVideoXDiT", "CPDiT", "CPDiTConfig"]
