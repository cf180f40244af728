# Run a function on N local ranks with a real gloo process group (file:// rendezvous, one thread per rank): the one
# spawn harness of the tests and the benchmarks. `spawn_ranks` starts fresh processes for one call (benchmarks:
# nothing else runs in them); `RankPool` keeps N ranks for many calls (tests: a spawn, a torch import and a
# rendezvous per test were most of the suite's time), restoring a fresh process's RNG state and default dtype before
# each. Either way a rank that raises is reported with its traceback and a hung one after `timeout` seconds.
from __future__ import annotations

import datetime
import os
import queue
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.distributed import forget_meshes, teardown_distributed

PG_TIMEOUT_S = 90.0


class RanksFailed(AssertionError):
    """A rank raised, died or hung; the message holds its traceback."""


def _init(rank: int, world_size: int, init_file: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    os.environ["CPDIT_TEST_RANK"] = str(rank)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _serve(rank: int, world_size: int, init_file: str, timeout_s: float, tasks, results) -> None:
    """A rank's loop: run each (fn, args) from `tasks`, put (rank, return value, traceback or None) on `results`;
    stop at None or after the first failure (its collectives may have left the group unusable)."""
    _init(rank, world_size, init_file, timeout_s)
    seed, ok = torch.initial_seed(), True
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            torch.manual_seed(seed)  # what a new process would have
            torch.set_default_dtype(torch.float32)
            torch.set_num_threads(1)
            try:
                results.put((rank, fn(rank, world_size, *args), None))
            except BaseException:  # noqa: BLE001 - reported to the caller, which ends this rank
                ok = False
                results.put((rank, None, traceback.format_exc()))
                return
            finally:
                forget_meshes()
    finally:
        teardown_distributed(barrier=ok)


class RankPool:
    """`world_size` ranks that run one function after another: `pool.run(fn, *args)` -> each rank's return value.
    After a failure the pool is closed; make a new one."""

    def __init__(self, world_size: int, directory: str | Path, timeout_s: float = PG_TIMEOUT_S):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.SimpleQueue() for _ in range(world_size)]
        self.results = ctx.Queue()
        init_file = str(Path(directory) / f"rdzv-{world_size}-{uuid.uuid4().hex}")
        self.procs = [
            ctx.Process(
                target=_serve, args=(r, world_size, init_file, timeout_s, self.tasks[r], self.results), daemon=True
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.closed = False

    def run(self, fn: Callable, *args, timeout: float = 240.0) -> list:
        """Collective over the pool's ranks: fn(rank, world_size, *args) on each; raises RanksFailed (and closes
        the pool) when a rank raises, dies or runs past `timeout`."""
        for q in self.tasks:
            q.put((fn, args))
        values: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(values) < self.world_size:
            try:
                rank, value, error = self.results.get(timeout=2.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    codes = [self.procs[r].exitcode for r in dead]
                    self._fail(f"rank(s) {dead} died during {fn.__name__} (exit codes {codes})")
                if time.monotonic() > deadline:
                    self._fail(f"{fn.__name__} on {self.world_size} ranks did not finish within {timeout:.0f}s")
                continue
            if error is not None:
                self._fail(f"rank {rank} of {fn.__name__} raised:\n{error}")
            values[rank] = value
        return [values[r] for r in range(self.world_size)]

    def threads(self) -> int:
        """The most threads any rank runs now (from /proc; 0 where there is none). Every process group a task
        creates stays registered, and each gloo group keeps a TCP loop thread that wakes even while idle."""
        counts = []
        for p in self.procs:
            try:
                counts.append(len(os.listdir(f"/proc/{p.pid}/task")))
            except OSError:
                pass
        return max(counts, default=0)

    def _fail(self, message: str):
        self.close(kill=True)
        raise RanksFailed(message)

    def close(self, kill: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(20)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def spawn_ranks(
    fn: Callable, world_size: int, *args, directory: str | Path, timeout: float = 3600.0, pg_timeout_s: float = 1800.0
) -> list:
    """fn(rank, world_size, *args) on `world_size` fresh processes (rendezvous file under `directory`); returns each
    rank's return value."""
    pool = RankPool(world_size, directory, pg_timeout_s)
    try:
        return pool.run(fn, *args, timeout=timeout)
    finally:
        pool.close()
