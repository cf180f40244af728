# What a training run carries from step to step and writes into every checkpoint's meta.json: the step, the data
# position, the bad-step counter and the fp16 loss scale. One `state_dict()` and one `load_meta()`.
from __future__ import annotations

from dataclasses import dataclass, field

from launch.job.data import DataPosition
from launch.job.loss_scale import DynamicLossScale


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    position: DataPosition = field(default_factory=DataPosition)
    """Where the data stream stands (epoch, clips taken) after `step` steps."""
    bad_steps_total: int = 0
    """Steps skipped by the NaN/inf guard over the whole run."""
    consecutive_bad: int = 0
    """Skipped steps in a row (not checkpointed: a resumed run starts a new streak)."""
    loss_scale: DynamicLossScale | None = None
    """fp16 dynamic loss scale (None without fp16 mixed precision)."""

    def state_dict(self) -> dict:
        """The checkpoint's meta.json entries ("step" is written by the checkpoint itself)."""
        meta = {"data": vars(self.position), "bad_steps_total": self.bad_steps_total}
        if self.loss_scale is not None:
            meta["loss_scale"] = self.loss_scale.state_dict()
        return meta

    def load_meta(self, meta: dict) -> None:
        self.step, self.position = meta["step"], DataPosition.from_meta(meta)
        self.bad_steps_total = meta.get("bad_steps_total", 0)
        if self.loss_scale is not None and "loss_scale" in meta:
            self.loss_scale.load_state_dict(meta["loss_scale"])
