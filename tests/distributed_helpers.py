# The tests' use of the one spawn harness (launch/spawn.py): ranks are spawned once per world size and pytest session
# and run one test function after another, each from a fresh process's RNG state and default dtype. A rank that
# raises fails the test with its traceback, a hung one fails it after `timeout` seconds; either way that pool is
# closed and the next test gets new processes. `fresh=True` runs a test in processes of its own.
from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from launch.spawn import RankPool, spawn_ranks

_POOLS: dict[int, RankPool] = {}
_DIR: list[str] = []  # the rendezvous directory, made by the first pool (not by ranks importing this module)


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
    for d in _DIR:
        shutil.rmtree(d, ignore_errors=True)


def run_ranks(fn: Callable, world_size: int, tmp_path: Path, *args, timeout: float = 240.0, fresh: bool = False):
    """Run `fn(rank, world_size, *args)` on `world_size` ranks. `fn` must be a module-level function; it creates
    its own meshes and groups (sub-groups of the default group) and leaves no other state behind."""
    if fresh:
        return spawn_ranks(fn, world_size, *args, directory=tmp_path, timeout=timeout, pg_timeout_s=90.0)
    pool = _POOLS.get(world_size)
    if pool is None or pool.closed:
        if not _DIR:
            _DIR.append(tempfile.mkdtemp(prefix="cpdit-ranks-"))
        pool = _POOLS[world_size] = RankPool(world_size, _DIR[0])
    return pool.run(fn, *args, timeout=timeout)
