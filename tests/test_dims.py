# ParallelDims: validation tables (pure) and real meshes on 1, 2, 4 and 8 gloo ranks.
import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks

from launch.selfcheck import check_mesh_groups
from parallel.dims import FLAT_DIMS, MESH_DIMS, ParallelDims, TopologyError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=8, cp_size=3), "cp_size=3 x model_parallel_size=1 = 3 does not divide world_size=8"),
        (dict(world_size=8, cp_size=6, ulysses_size=4), "ulysses_size=4 does not divide cp_size=6"),
        (dict(world_size=4, cp_size=2, model_parallel_size=4), "= 8 does not divide world_size=4"),
        (dict(world_size=8, cp_size=2, dp_replicate=3), "dp_replicate=3 does not divide"),
        (dict(world_size=0), "world_size=0 must be >= 1"),
        (dict(world_size=4, cp_size=0), "cp_size=0 must be >= 1"),
        (dict(world_size=4, cp_size=-2), "cp_size=-2 must be >= 1"),
        (dict(world_size=4, model_parallel_size=2.0), "model_parallel_size=2.0 must be a positive integer"),
        (dict(world_size=4, cp_size=True), "cp_size=True must be a positive integer"),
        (dict(world_size=4, ulysses_size=2), "ulysses_size=2 does not divide cp_size=1"),
    ],
)
def test_invalid_topologies(kwargs, message):
    with pytest.raises(TopologyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims(**kwargs)


def test_derived_degrees_and_coords():
    d = ParallelDims(16, cp_size=4, model_parallel_size=2, ulysses_size=2, dp_replicate=1)
    assert (d.dp_shard, d.ring_size, d.dp, d.size("cp"), d.size("dp_shard_cp"), d.size("dp_cp")) == (
        2,
        2,
        2,
        4,
        8,
        8,
    )
    assert d.shape == (1, 2, 2, 2, 2)
    # tp innermost: rank 1 differs from rank 0 only in tp; rank 2 only in cp_ulysses; rank 4 in cp_ring.
    assert d.coords(1)["tp"] == 1 and d.coords(2)["cp_ulysses"] == 1 and d.coords(4)["cp_ring"] == 1
    assert d.coords(8)["dp_shard"] == 1 and d.coords(8)["cp"] == 0 and d.coords(6)["cp"] == 3
    assert d.coords(15)["dp_shard_cp"] == 7
    # seed policy: same seed inside a cp x tp group, distinct across data-parallel ranks.
    seeds = [d.draw_seed(7, r, 3, 1) for r in range(16)]
    assert len(set(seeds[:8])) == 1 and len(set(seeds[8:])) == 1 and seeds[0] != seeds[8]
    draws = {d.draw_seed(7, r, step, i) for r in (0, 8) for step in range(4) for i in (0, 1, 1 << 20)}
    assert len(draws) == 2 * 4 * 3  # distinct across dp ranks, steps and indices
    with pytest.raises(TopologyError, match="rank=16 outside world_size=16"):
        d.coords(16)


LAYOUTS = {
    1: [dict()],
    2: [dict(cp_size=2), dict(model_parallel_size=2), dict(), dict(cp_size=2, ulysses_size=2)],
    4: [
        dict(cp_size=2, model_parallel_size=2),
        dict(cp_size=4, ulysses_size=2),
        dict(cp_size=4),
        dict(cp_size=2, dp_replicate=2),
        dict(model_parallel_size=4),
        dict(cp_size=4, ulysses_size=4),
    ],
    8: [
        dict(cp_size=4, ulysses_size=2, model_parallel_size=2),
        dict(cp_size=2, model_parallel_size=2),
        dict(cp_size=2, dp_replicate=2, model_parallel_size=2),
    ],
}


def _mesh_worker(rank, world, layouts):
    for kwargs in layouts:
        dims = ParallelDims(world, **kwargs)
        mesh = dims.build_mesh("cpu")
        sizes = check_mesh_groups(dims, mesh, rank)  # all-reduce over every group vs predicted membership
        for name in MESH_DIMS + tuple(FLAT_DIMS):
            assert sizes[name] == dims.size(name), (kwargs, name, sizes)
            assert mesh[name].size() == dims.size(name)
        cp2d = mesh.cp_mesh()
        assert cp2d.mesh_dim_names == ("cp_ring", "cp_ulysses") and cp2d.size() == dims.cp
        # a collective over the cp 2-D sub-mesh's flattened group: sum of cp coordinates 0..cp-1
        t = torch.tensor([float(dims.coords(rank)["cp"])])
        dist.all_reduce(t, group=mesh.get_group("cp"))
        assert t.item() == dims.cp * (dims.cp - 1) / 2
        del mesh, cp2d


@pytest.mark.parametrize("world", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_mesh_groups(tmp_path, world):
    run_ranks(_mesh_worker, world, tmp_path, LAYOUTS[world])


def test_one_writer_per_replica():
    d = ParallelDims(16, cp_size=4, model_parallel_size=2)  # dp = 2
    writers = [r for r in range(16) if d.is_writer(r)]
    assert writers == [0, 8] and sorted(d.dp_rank(r) for r in writers) == [0, 1]


def _node_worker(rank, world, per_node):
    dims = ParallelDims(world, cp_size=2, model_parallel_size=2)  # the default job's layout
    mesh = dims.build_mesh("cpu")
    tp = dist.get_process_group_ranks(mesh.get_group("tp"))
    cp = dist.get_process_group_ranks(mesh.get_group("cp"))
    node = rank // per_node  # torchrun numbers ranks node by node: node n holds n * per_node ... (n + 1) * per_node - 1
    assert {r // per_node for r in tp} == {node}, f"rank {rank}: tp group {tp} leaves node {node}"
    assert len({r // per_node for r in cp}) == 2, f"rank {rank}: cp group {cp} stays inside node {node}"
    del mesh


def test_tensor_parallel_groups_stay_inside_a_node(tmp_path):
    """tp is the innermost mesh axis: on 2 nodes x 2 ranks (tests/test_multinode.py's layout) each tp group is one
    node's ranks, and only the cp groups cross nodes, as the README says."""
    run_ranks(_node_worker, 4, tmp_path, 2)


def _timeout_worker(rank, world):
    import datetime
    import time

    dims = ParallelDims(world, cp_size=2, model_parallel_size=2)
    mesh = dims.build_mesh("cpu", datetime.timedelta(seconds=2))
    if rank == 1:  # never joins rank 0's tp all-reduce
        time.sleep(4)
        return "slept"
    if rank == 0:
        try:
            dist.all_reduce(torch.ones(1), group=mesh.get_group("tp"))
        except RuntimeError as err:
            return str(err)
    return "other"


def test_the_mesh_groups_take_the_jobs_timeout(tmp_path):
    """DeviceMesh makes its groups with c10d's default timeout (30 min on gloo); build_mesh(timeout=) sets the job's
    (dist.timeout_s) on each, so a peer that never arrives fails a sub-group collective after it."""
    got = run_ranks(_timeout_worker, 4, tmp_path, fresh=True)
    assert "Timed out waiting 2000ms" in got[0], got
