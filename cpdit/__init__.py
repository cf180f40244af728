# cpdit: single-device model and diffusion code (no torch.distributed here; parallel/ applies parallelism).
from cpdit.models.cogvideox.config import PRESETS, CogVideoXConfig
from cpdit.models.cogvideox.model import CogVideoXDiT

__all__ = ["CogVideoXDiT", "CogVideoXConfig", "PRESETS"]
