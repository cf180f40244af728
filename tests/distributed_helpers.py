# The tests' use of the one spawn harness (launch/spawn.py): ranks are spawned once per world size and pytest session
# and run one test function after another, each from a fresh process's RNG state and default dtype. A rank that
# raises fails the test with its traceback, a hung one fails it after `timeout` seconds; either way that pool is
# closed and the next test gets new processes. `fresh=True` runs a test in processes of its own.
#
# Pools are recycled: the process groups a test's meshes create stay registered in its ranks (destroying them would
# leave DTensor's sharding caches pointing at dead groups), and every gloo group keeps a TCP loop thread that wakes
# while idle. Kept for a whole session, a few hundred tests' groups made the idle 2-, 4- and 8-rank pools use more
# CPU than the 2 cores have (365 threads per rank after 15 cp x tp tests; load average 236), and every later job,
# test and benchmark crawled. So a pool is closed once a rank runs MAX_RANK_THREADS threads, and at the end of
# every test module (tests/conftest.py).
from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from launch.spawn import RankPool, spawn_ranks

MAX_RANK_THREADS = 120  # ~30 groups' threads over a fresh rank's ~29
_POOLS: dict[int, RankPool] = {}
_DIR: list[str] = []  # the rendezvous directory, made by the first pool (not by ranks importing this module)


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@atexit.register
def _at_exit() -> None:
    close_pools()
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
    values = pool.run(fn, *args, timeout=timeout)
    if pool.threads() > MAX_RANK_THREADS:
        pool.close()
    return values
