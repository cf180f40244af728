# The `debug` config section: faults injected on purpose so the tests can prove what a real failure does. By
# default a fault fires only in the first elastic attempt (launch/job/train.py: elastic_attempt), so a restarted job
# gets past it as it would past a transient failure.
from __future__ import annotations

import time

from launch.config import DebugConfig
from parallel.progress import PROGRESS


class Faults:
    def __init__(self, debug: DebugConfig, rank: int, attempt: int):
        self.d, self.rank = debug, rank
        self.armed = debug.every_attempt or attempt == 0

    def step_start(self, step: int) -> None:
        d = self.d
        if d.step_sleep_s > 0:
            time.sleep(d.step_sleep_s)
        if not self.armed or self.rank != d.fail_rank:
            return
        if d.fail_at_step == step:
            raise RuntimeError(f"injected failure at step {step} on rank {self.rank} (debug.fail_at_step)")
        if d.hang_at_step == step:
            PROGRESS.phase = "stuck (debug.hang_at_step)"
            while True:  # a worker that stops making progress; only the watchdog or a timeout ends it
                time.sleep(1.0)

    def nan_loss(self, step: int) -> bool:
        return self.d.nan_at_step == step  # every attempt: part of the deterministic trajectory

    def save_fault(self, step: int) -> str | None:
        return self.d.fail_save if self.armed and self.d.fail_save_at_step == step else None
