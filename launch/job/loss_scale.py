# Dynamic loss scaling for fp16 autocast. The overflow test is the global gradient norm, which is already reduced
# over every shard (parallel/grad_norm.py), so all ranks take the same decision without an extra collective —
# the job of torch's ShardedGradScaler, for FSDP2 x TP DTensors and plain tensors alike.
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class DynamicLossScale:
    scale: float = 65536.0
    """Current multiplier of the loss before backward."""
    window: int = 1000
    """Finite steps in a row before the scale doubles."""
    min_scale: float = 1.0
    good_steps: int = 0
    overflows: int = 0

    def update(self, grad_norm: float) -> bool:
        """After backward: True if the (unscaled) gradient is finite and the step may be taken. On overflow the
        scale halves; after `window` good steps it doubles."""
        if not math.isfinite(grad_norm):
            self.scale = max(self.scale / 2, self.min_scale)
            self.good_steps = 0
            self.overflows += 1
            return False
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2
            self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
