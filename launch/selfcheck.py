# Distributed self-check: builds the mesh of the configured topology and proves every group with a
# collective whose result is known in closed form. Run with `cpdit-launch selfcheck`.
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from launch.config import JobConfig
from launch.distributed import distributed
from launch.env import DistEnv
from parallel.dims import FLAT_DIMS, MESH_DIMS, ParallelDims


def check_mesh_groups(dims: ParallelDims, mesh, rank: int) -> dict[str, int]:
    """All-reduce the global rank over every mesh dim and flattened view; compare with the members that
    `ParallelDims.coords` predicts. Returns {dim: group size}."""
    me = dims.coords(rank)
    sizes = {}
    for name in MESH_DIMS + tuple(FLAT_DIMS):
        group = mesh[name].get_group()
        peers = [
            r
            for r in range(dims.world_size)
            if all(dims.coords(r)[d] == me[d] for d in MESH_DIMS if d not in FLAT_DIMS.get(name, (name,)))
        ]
        t = torch.tensor([float(rank), 1.0], dtype=torch.float64)
        dist.all_reduce(t, group=group)
        if t[0].item() != sum(peers) or int(t[1].item()) != len(peers) or mesh[name].get_local_rank() != me[name]:
            raise RuntimeError(
                f"rank {rank}: group {name} reduced {t.tolist()}, expected ranks {peers} "
                f"(local rank {mesh[name].get_local_rank()} vs {me[name]})"
            )
        sizes[name] = len(peers)
    return sizes


def selfcheck(cfg: JobConfig, env: DistEnv) -> int:
    dims = ParallelDims.from_config(cfg.parallel, env.world_size)
    with distributed(env, cfg.dist.backend, cfg.dist.timeout_s) as device:
        mesh = dims.build_mesh(device.type, timedelta(seconds=cfg.dist.timeout_s))
        sizes = check_mesh_groups(dims, mesh, env.rank)
        seed = dims.draw_seed(cfg.train.seed, env.rank, 0, 0)  # the first draw of step 0
        coords = {k: v for k, v in dims.coords(env.rank).items() if k in MESH_DIMS}
        line = f"  rank {env.rank} (local {env.local_rank}, node {env.node_rank}): coords {coords} seed={seed}"
        lines = [None] * env.world_size
        dist.all_gather_object(lines, line)  # one writer: no interleaved output from several ranks
        if env.rank == 0:
            print(
                f"cpdit selfcheck: launcher={env.launcher} nodes={env.num_nodes} device={device.type} "
                f"backend={dist.get_backend()}",
                flush=True,
            )
            print(f"  topology: {dims.describe()}", flush=True)
            print("  groups: " + " ".join(f"{k}={v}" for k, v in sizes.items()), flush=True)
            print("\n".join(lines), flush=True)
        del mesh
    if env.rank == 0:
        print("cpdit selfcheck: OK", flush=True)
    return 0
