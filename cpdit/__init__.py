# cpdit: single-device model and diffusion code (no torch.distributed here; parallel/ applies parallelism).
from cpdit.config import PRESETS, CPDiTConfig
from cpdit.model import CPDiT

__all__ = ["CPDiT", "CPDiTConfig", "PRESETS"]
