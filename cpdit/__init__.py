# cpdit: single-device model and diffusion code (no torch.distributed here; parallel/ applies parallelism).
from cpdit.models.cogvideox.config import PRESETS, CogVideoXConfig, CPDiTConfig
from cpdit.models.cogvideox.model import CogVideoXDiT, CPDiT

__all__ = ["CogVideoXDiT", "CogVideoXConfig", "PRESETS", "CPDiT", "CPDiTConfig"]
