# Hang detection. A thread per rank watches the training step: when one takes far longer than the recent median
# (dist.watchdog_factor x median, at least dist.watchdog_min_s), every rank dumps all its Python stacks
# (faulthandler) and where it is (parallel/progress.py) to <run>/hang/, waits briefly for its peers' dumps, names
# the slow rank(s) and the last collective each rank entered, and ends its process with EXIT_HANG. The process-
# group timeout (dist.timeout_s) stays as the outer bound; neither can leave a job waiting forever.
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from parallel.progress import PROGRESS

EXIT_HANG = 124  # like timeout(1)


class HangWatchdog:
    def __init__(
        self,
        hang_dir: Path,
        rank: int,
        world_size: int,
        factor: float,
        min_s: float,
        first_step_s: float,
        grace_s: float = 5.0,
        poll_s: float = 0.25,
    ):
        self.dir, self.rank, self.world = hang_dir, rank, world_size
        self.factor, self.min_s, self.first_step_s = factor, min_s, first_step_s
        self.grace_s, self.poll_s = grace_s, poll_s
        self.durations: deque[float] = deque(maxlen=20)
        self.started: float | None = None  # monotonic start of the step being watched; None: disarmed
        self.created = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpdit-hang-watchdog", daemon=True)

    # ---- called by the training loop ----
    def start(self) -> HangWatchdog:
        self._thread.start()
        return self

    def step_begin(self) -> None:
        self.started = time.monotonic()

    def step_end(self) -> None:
        if self.started is not None:
            self.durations.append(time.monotonic() - self.started)
        self.started = None  # checkpointing and sampling between steps are bounded by dist.timeout_s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def limit(self) -> float:
        if len(self.durations) < 3:  # warm-up steps (compilation, first all-gathers) are not typical
            return max(self.first_step_s, self.min_s)
        return max(self.factor * statistics.median(self.durations), self.min_s)

    # ---- the watchdog thread ----
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            started = self.started
            if started is not None and time.monotonic() - started > self.limit():
                self._fire(time.monotonic() - started)
                return

    def _fire(self, elapsed: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        me = {**PROGRESS.snapshot(), "rank": self.rank, "pid": os.getpid(), "elapsed_s": round(elapsed, 1)}
        dump = self.dir / f"rank{self.rank}.txt"
        with open(dump, "w") as f:
            f.write(json.dumps(me) + "\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        peers = self._collect_peers()
        report = hang_report(peers, self.world, elapsed, self.limit())
        if self.rank == min(peers):
            (self.dir / "report.txt").write_text(report + "\n")
        print(f"[rank {self.rank}] {report}\n[rank {self.rank}] stack dumps: {self.dir}", file=sys.stderr, flush=True)
        os._exit(EXIT_HANG)  # the main thread is blocked; the launcher tears down the rest of the job

    def _collect_peers(self) -> dict[int, dict]:
        deadline = time.monotonic() + self.grace_s
        peers: dict[int, dict] = {}
        while True:
            for r in range(self.world):
                if r in peers:
                    continue
                path = self.dir / f"rank{r}.txt"
                try:
                    if path.stat().st_mtime >= self.created - 1:
                        peers[r] = json.loads(path.read_text().splitlines()[0])
                except (OSError, ValueError, IndexError):
                    pass  # not written (yet), or half-written
            if len(peers) == self.world or time.monotonic() > deadline:
                return peers
            time.sleep(0.1)


def slow_ranks(peers: dict[int, dict], world: int) -> list[int]:
    """Ranks that did not answer; else, among the ranks computing (not inside a collective we mark), or all ranks
    if none computes, those furthest behind in (step, phases, collectives)."""
    silent = [r for r in range(world) if r not in peers]
    if silent:
        return silent
    computing = {r: p for r, p in peers.items() if p.get("collective") is None}
    candidates = computing or peers

    def key(p: dict) -> tuple[int, int, int]:
        return p["step"], p["phases"], p["collectives"]

    behind = min(key(p) for p in candidates.values())
    return sorted(r for r, p in candidates.items() if key(p) == behind)


def hang_report(peers: dict[int, dict], world: int, elapsed: float, limit: float) -> str:
    slow = slow_ranks(peers, world)
    lines = [
        f"hang detected: a training step has run {elapsed:.0f} s (limit {limit:.0f} s: dist.watchdog_factor x "
        f"median step time, at least dist.watchdog_min_s); slow rank(s): {slow}"
    ]
    for r in range(world):
        p = peers.get(r)
        if p is None:
            lines.append(f"  rank {r}: no stack dump (stuck outside Python, or dead)")
            continue
        where = (
            f"waiting in {p['collective']}"
            if p["collective"]
            else f"in {p['phase']} (computing, or in a TP/FSDP collective)"
        )
        lines.append(f"  rank {r}: step {p['step']}, {where}; last collective entered: {p['last_collective']}")
    return "\n".join(lines)
