# resolve_dist_env: one table per launcher, and the inconsistent environments it must refuse.
import pytest

from launch.env import LaunchEnvError, expand_hostlist, expand_tasks_per_node, resolve_dist_env

T = dict(MASTER_ADDR="10.0.0.1", MASTER_PORT="29400")

GOOD = [
    # (environment, rank, local_rank, world, local_world, master_addr, master_port, launcher)
    ({}, 0, 0, 1, 1, "127.0.0.1", 29500, "single"),
    ({"MASTER_PORT": "1234"}, 0, 0, 1, 1, "127.0.0.1", 1234, "single"),
    (
        dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4", **T),
        5,
        1,
        8,
        4,
        "10.0.0.1",
        29400,
        "torchrun",
    ),
    (dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", **T), 0, 0, 1, 1, "10.0.0.1", 29400, "torchrun"),
    # torchrun variables win over the SLURM/MPI ones of the surrounding allocation.
    (
        dict(
            RANK="3",
            LOCAL_RANK="3",
            WORLD_SIZE="4",
            LOCAL_WORLD_SIZE="4",
            SLURM_PROCID="0",
            SLURM_NTASKS="1",
            OMPI_COMM_WORLD_RANK="0",
            OMPI_COMM_WORLD_SIZE="1",
            **T,
        ),
        3,
        3,
        4,
        4,
        "10.0.0.1",
        29400,
        "torchrun",
    ),
    # Open MPI 5 maps by core: local rank differs from rank on one node.
    (
        dict(
            OMPI_COMM_WORLD_RANK="2",
            OMPI_COMM_WORLD_SIZE="4",
            OMPI_COMM_WORLD_LOCAL_RANK="1",
            OMPI_COMM_WORLD_LOCAL_SIZE="4",
        ),
        2,
        1,
        4,
        4,
        None,
        None,
        "openmpi",
    ),
    (
        dict(
            OMPI_COMM_WORLD_RANK="7",
            OMPI_COMM_WORLD_SIZE="8",
            OMPI_COMM_WORLD_LOCAL_RANK="3",
            OMPI_COMM_WORLD_LOCAL_SIZE="4",
            MASTER_ADDR="n0",
            MASTER_PORT="5000",
        ),
        7,
        3,
        8,
        4,
        "n0",
        5000,
        "openmpi",
    ),
    (dict(PMI_RANK="3", PMI_SIZE="4", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2"), 3, 1, 4, 2, None, None, "mpich"),
    (dict(PMI_RANK="0", PMI_SIZE="2"), 0, 0, 2, 1, None, None, "mpich"),
    (
        dict(
            SLURM_PROCID="5",
            SLURM_NTASKS="8",
            SLURM_LOCALID="1",
            SLURM_NODEID="1",
            SLURM_TASKS_PER_NODE="4(x2)",
            SLURM_JOB_NODELIST="gpu-[003-005,010],cpu1",
            SLURM_JOB_ID="1234",
        ),
        5,
        1,
        8,
        4,
        "gpu-003",
        21234,
        "slurm",
    ),
    (
        dict(
            SLURM_PROCID="2",
            SLURM_NTASKS="3",
            SLURM_LOCALID="0",
            SLURM_NODEID="1",
            SLURM_TASKS_PER_NODE="2,1",
            SLURM_NODELIST="a,b",
            MASTER_PORT="7000",
        ),
        2,
        0,
        3,
        1,
        "a",
        7000,
        "slurm",
    ),
    (
        dict(
            SLURM_PROCID="0",
            SLURM_NTASKS="4",
            SLURM_LOCALID="0",
            SLURM_NTASKS_PER_NODE="4",
            SLURM_JOB_NODELIST="node1",
            MASTER_ADDR="127.0.0.1",
        ),
        0,
        0,
        4,
        4,
        "127.0.0.1",
        20000,
        "slurm",
    ),
]


@pytest.mark.parametrize("environ, rank, local_rank, world, local_world, addr, port, launcher", GOOD)
def test_launchers(environ, rank, local_rank, world, local_world, addr, port, launcher):
    env = resolve_dist_env(environ)
    got = (
        env.rank,
        env.local_rank,
        env.world_size,
        env.local_world_size,
        env.master_addr,
        env.master_port,
        env.launcher,
    )
    assert got == (rank, local_rank, world, local_world, addr, port, launcher)
    assert env.master_port is None or isinstance(env.master_port, int)


BAD = [
    (dict(RANK="4", LOCAL_RANK="0", WORLD_SIZE="4", **T), "RANK=4 is not below WORLD_SIZE=4"),
    (dict(RANK="x", LOCAL_RANK="0", WORLD_SIZE="4", **T), "RANK='x' is not an integer"),
    (dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", MASTER_ADDR="h"), "MASTER_PORT missing"),
    (dict(RANK="0", WORLD_SIZE="4", **T), "LOCAL_RANK missing"),
    (dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", MASTER_ADDR="h", MASTER_PORT="99999"), "not a TCP port"),
    (dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="0", **T), "WORLD_SIZE=0 must be >= 1"),
    (dict(RANK="-1", LOCAL_RANK="0", WORLD_SIZE="2", **T), "RANK=-1 is negative"),
    (dict(RANK="1", LOCAL_RANK="2", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", **T), "LOCAL_RANK=2 is not below"),
    (dict(OMPI_COMM_WORLD_RANK="4", OMPI_COMM_WORLD_SIZE="4"), "OMPI_COMM_WORLD_RANK=4 is not below"),
    (dict(OMPI_COMM_WORLD_RANK="0"), "without OMPI_COMM_WORLD_SIZE"),
    (
        dict(
            OMPI_COMM_WORLD_RANK="1",
            OMPI_COMM_WORLD_SIZE="2",
            OMPI_COMM_WORLD_LOCAL_RANK="2",
            OMPI_COMM_WORLD_LOCAL_SIZE="2",
        ),
        "OMPI_COMM_WORLD_LOCAL_RANK=2 is not below",
    ),
    (dict(PMI_RANK="0"), "PMI_SIZE is missing"),
    (dict(SLURM_PROCID="0"), "SLURM_NTASKS is missing"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_TASKS_PER_NODE="4(x3)"), "sums to 12"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_TASKS_PER_NODE="4(y2)"), "is not like"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_JOB_NODELIST="gpu-[003-00"), "unbalanced"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_JOB_NODELIST="gpu-[5-3]"), "bad range"),
    (dict(SLURM_PROCID="abc", SLURM_NTASKS="4"), "SLURM_PROCID='abc' is not an integer"),
]


@pytest.mark.parametrize("environ, message", BAD)
def test_bad_environments(environ, message):
    with pytest.raises(LaunchEnvError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_dist_env(environ)


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node1", ["node1"]),
        ("gpu-[003-005,010],cpu1", ["gpu-003", "gpu-004", "gpu-005", "gpu-010", "cpu1"]),
        ("a[1-2],b[08-10]", ["a1", "a2", "b08", "b09", "b10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("node[1-2]", ["node1", "node2"]),
    ],
)
def test_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


def test_tasks_per_node():
    assert expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert expand_tasks_per_node("2") == [2]
