# Spawn N real processes with a real gloo process group (file:// rendezvous under pytest's tmp_path).
# A failing rank fails the test with its traceback; a hung rank fails it after `timeout` seconds.
from __future__ import annotations

import datetime
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.distributed import teardown_distributed

PG_TIMEOUT_S = 90.0


def _worker(rank: int, fn: Callable, world_size: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["CPDIT_TEST_RANK"] = str(rank)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    ok = False
    try:
        fn(rank, world_size, *args)
        ok = True
    finally:
        teardown_distributed(barrier=ok)


def run_ranks(fn: Callable, world_size: int, tmp_path: Path, *args, timeout: float = 240.0) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks. `fn` must be a module-level function."""
    init_file = Path(tmp_path) / f"rdzv-{uuid.uuid4().hex}"
    ctx = mp.start_processes(
        _worker,
        args=(fn, world_size, str(init_file), args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=5.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout:.0f}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
