# Process-group set-up and teardown for every launcher (torchrun, mpirun, srun, single process).
from __future__ import annotations

import datetime
import gc
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from launch.env import DEFAULT_MASTER_PORT, DistEnv


def pick_backend(backend: str = "auto") -> str:
    """`auto` -> nccl when CUDA is available, gloo otherwise."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"dist.backend={backend!r} is not one of auto, nccl, gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("dist.backend='nccl' needs CUDA, which this torch build/machine lacks; use 'gloo'")
    return backend


def device_for(env: DistEnv, backend: str) -> torch.device:
    """The device this rank computes on: cuda:local_rank under NCCL, cpu under gloo."""
    if backend == "nccl":
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise RuntimeError(
                f"local_rank={env.local_rank} but this node has {count} CUDA devices; launch at most "
                f"{count} processes per node (--nproc-per-node)"
            )
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_agree_master(env: DistEnv) -> tuple[str, int]:
    """Under mpirun without MASTER_ADDR: rank 0 picks its address and a free port, mpi4py broadcasts them."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size or comm.Get_rank() != env.rank:
        raise RuntimeError(
            f"mpi4py sees rank {comm.Get_rank()}/{comm.Get_size()} but the environment says "
            f"{env.rank}/{env.world_size}; the mpi4py build does not match the mpirun that started this job"
        )
    choice = None
    if env.rank == 0:
        host = env.master_addr or socket.gethostname()
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = "127.0.0.1"
        choice = (addr, env.master_port or _free_port())
    return comm.bcast(choice, root=0)


def resolve_master(env: DistEnv) -> tuple[str, int]:
    if env.launcher in ("openmpi", "mpich") and (env.master_addr is None or env.master_port is None):
        return _mpi_agree_master(env)
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        return "127.0.0.1", _free_port()  # nobody else to agree with: avoid clashing on the default port
    return env.master_addr or "127.0.0.1", env.master_port or DEFAULT_MASTER_PORT


def init_distributed(
    env: DistEnv,
    backend: str = "auto",
    timeout: datetime.timedelta | float = 600.0,
    init_method: str | None = None,
) -> torch.device:
    """Initialise the default process group for `env` and return this rank's device.

    A single-process environment also gets a (world-size-1) process group so the same code paths run.
    `timeout` bounds every collective: a dead peer fails the job instead of hanging it."""
    if isinstance(timeout, int | float):
        timeout = datetime.timedelta(seconds=float(timeout))
    backend = pick_backend(backend)
    device = device_for(env, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if init_method is None:
        addr, port = resolve_master(env)
        init_method = f"tcp://{addr}:{port}"
        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return device


def teardown_distributed(barrier: bool = True) -> None:
    """Destroy the process group and drop lingering references (torch 2.13 + gloo can SIGABRT at exit while a
    ProcessGroup or DeviceMesh is still referenced). `barrier=False` after a failure: peers may be gone."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    forget_meshes()
    gc.collect()


def forget_meshes() -> None:
    """Drop DeviceMesh's process-wide bookkeeping, which keeps meshes (and so their ProcessGroups) alive: every list
    and dict of `_mesh_resources` (torch 2.13 has only its mesh stack; older releases also kept child, flatten and
    group-option mappings there)."""
    from torch.distributed.device_mesh import _mesh_resources

    for container in vars(_mesh_resources).values():
        if isinstance(container, list | dict):
            container.clear()


@contextmanager
def distributed(
    env: DistEnv, backend: str = "auto", timeout: float = 600.0, init_method: str | None = None
) -> Iterator[torch.device]:
    """`with distributed(env) as device:` — init, yield, always tear down."""
    device = init_distributed(env, backend, timeout, init_method)
    ok = False
    try:
        yield device
        ok = True
    finally:
        teardown_distributed(barrier=ok)
