# Preemption: SIGTERM or SIGUSR1 (what SLURM's --signal=USR1@N and scancel send) only raise a flag; the ranks agree
# on it at the next step boundary with one tiny all-reduce, save a checkpoint together and stop. A second signal
# during the save changes nothing. The job then exits with EXIT_PREEMPTED (launch/slurm.sbatch requeues on it);
# under torchrun the workers exit 0 (so the elastic agent does not restart them) and leave a marker that
# cpdit-launch turns into EXIT_PREEMPTED.
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from parallel.comm import agree

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
MARKER = "PREEMPTED.json"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag set by the preemption signals; `agreed()` is the per-step collective that makes every rank stop at
    the same step."""

    def __init__(self, rank: int):
        self.rank = rank
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            print(f"[rank {self.rank}] {name}: checkpoint and stop at the next step boundary", file=sys.stderr)

    def agreed(self) -> bool:
        """Collective over the default group: True on every rank if any rank was signalled."""
        return bool(agree([self.signum is not None], "max", "stop flag")[0])


def under_torchelastic() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def write_marker(run_dir: Path, step: int, checkpoint: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{MARKER}.{os.getpid()}"
    tmp.write_text(json.dumps({"step": step, "checkpoint": str(checkpoint), "time": time.time()}))
    tmp.replace(run_dir / MARKER)


def clear_marker(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)


def read_marker(run_dir: Path, since: float) -> dict | None:
    """The marker written by this launch (newer than `since`), or None."""
    try:
        data = json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("time", 0) >= since else None
