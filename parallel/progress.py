# Where this rank is: the training step, the phase inside it, and the collective it is waiting in. The training
# loop and the communication helpers write it (plain attribute stores, no locks: one writer, and a reader that
# only needs a recent snapshot); the hang watchdog (launch/job/watchdog.py) reads it from its own thread when a step
# takes far too long, to name the slow rank and the last collective every rank entered.
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass


@dataclass
class Progress:
    step: int = -1
    """Training step being computed (-1 before the first)."""
    phase: str = "start-up"
    """What the rank does now: data, forward, backward, optimizer, checkpoint, ..."""
    phases: int = 0
    """Phases entered so far (monotone): the rank with the fewest is furthest behind."""
    collective: str | None = None
    """The collective this rank is blocked in right now, None while it computes."""
    last_collective: str = "none"
    """The last collective this rank entered (with the step and phase it was entered in)."""
    collectives: int = 0
    """Collectives entered so far (monotone)."""
    since: float = 0.0
    """time.time() when the current phase began."""

    def enter(self, phase: str, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.phase, self.since = phase, time.time()
        self.phases += 1

    def snapshot(self) -> dict:
        return asdict(self)


PROGRESS = Progress()


@contextmanager
def in_collective(name: str) -> Iterator[None]:
    """Mark the enclosed code as waiting in collective `name` (for hang reports)."""
    PROGRESS.collective = name
    PROGRESS.last_collective = f"{name} (step {PROGRESS.step}, {PROGRESS.phase})"
    PROGRESS.collectives += 1
    try:
        yield
    finally:
        PROGRESS.collective = None
