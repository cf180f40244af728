# Which launcher started this process, and what rank / world / master it implies.
# `resolve_dist_env` is a pure function of an environment mapping so every launcher is table-tested.
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500


class LaunchEnvError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    `master_addr` / `master_port` may be None under MPI/SLURM when the launcher does not set them;
    `launch.distributed.init_distributed` then agrees on them (mpi4py broadcast, or the SLURM node list).
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    launcher: str  # "torchrun" | "openmpi" | "mpich" | "slurm" | "single"
    node_rank: int = 0
    num_nodes: int = 1


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer; the launcher environment is corrupt") from None
    if value < 0:
        raise LaunchEnvError(f"{name}={value} is negative")
    return value


def _port(environ: Mapping[str, str], name: str) -> int:
    port = _int(environ, name)
    if not 0 < port < 65536:
        raise LaunchEnvError(f"{name}={port} is not a TCP port (1..65535)")
    return port


def _check(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, str, str, str]) -> None:
    r, w, lr, lw = names
    if world < 1:
        raise LaunchEnvError(f"{w}={world} must be >= 1")
    if rank >= world:
        raise LaunchEnvError(f"{r}={rank} is not below {w}={world}")
    if local_world < 1:
        raise LaunchEnvError(f"{lw}={local_world} must be >= 1")
    if local_rank >= local_world:
        raise LaunchEnvError(f"{lr}={local_rank} is not below {lw}={local_world}")
    if local_world > world:
        raise LaunchEnvError(f"{lw}={local_world} exceeds {w}={world}")


# ---- SLURM host lists -----------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"unbalanced ']' in SLURM host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchEnvError(f"unbalanced '[' in SLURM host list {text!r}")
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_name(item: str, whole: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not m:
        return [item]
    prefix, ranges, suffix = m.groups()
    indices: list[str] = []
    for r in (x.strip() for x in ranges.split(",")):
        lo, _, hi = r.partition("-")
        hi = hi or lo
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise LaunchEnvError(f"bad range {r!r} in SLURM host list {whole!r}")
        indices.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    tails = _expand_name(suffix, whole)
    return [prefix + i + t for i in indices for t in tails]


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM compressed host list: `gpu-[003-005,010],cpu1` -> gpu-003 gpu-004 gpu-005 gpu-010 cpu1.

    Several bracket groups in one name (`r[1-2]n[1-2]`) expand as a product, as SLURM does."""
    return [h for item in _split_top_level(text) for h in _expand_name(item, text)]


def expand_tasks_per_node(text: str) -> list[int]:
    """`4(x2),3` -> [4, 4, 3] (SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE syntax)."""
    out: list[int] = []
    for item in _split_top_level(text):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise LaunchEnvError(f"SLURM_TASKS_PER_NODE entry {item!r} in {text!r} is not like '4' or '4(x2)'")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# ---- launchers ------------------------------------------------------------------------------------
_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    missing = [n for n in _TORCHRUN + ("MASTER_ADDR", "MASTER_PORT") if n not in environ]
    if missing:
        raise LaunchEnvError(
            f"torchrun-style variables are set ({', '.join(n for n in _TORCHRUN if n in environ)}) but "
            f"{', '.join(missing)} missing; set them all (torchrun does) or unset RANK/WORLD_SIZE/LOCAL_RANK"
        )
    rank, world, local_rank = (_int(environ, n) for n in _TORCHRUN)
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    _check(rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    node_rank = _int(environ, "GROUP_RANK") if "GROUP_RANK" in environ else rank // local_world
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        master_addr=environ["MASTER_ADDR"],
        master_port=_port(environ, "MASTER_PORT"),
        launcher="torchrun",
        node_rank=node_rank,
        num_nodes=max(1, -(-world // local_world)),
    )


def _master(environ: Mapping[str, str]) -> tuple[str | None, int | None]:
    addr = environ.get("MASTER_ADDR") or None
    port = _port(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else None
    return addr, port


def _from_openmpi(environ: Mapping[str, str]) -> DistEnv:
    names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    for n in names[:2]:
        if n not in environ:
            raise LaunchEnvError(f"Open MPI environment without {n}; is this process started by mpirun?")
    rank, world = _int(environ, names[0]), _int(environ, names[1])
    # Open MPI 5 maps ranks by core: local rank is its own variable, never derived from the rank.
    local_rank = _int(environ, names[2]) if names[2] in environ else 0
    local_world = _int(environ, names[3]) if names[3] in environ else 1
    _check(rank, world, local_rank, local_world, names)
    addr, port = _master(environ)
    # OMPI_COMM_WORLD_NODE_RANK is the rank *within* the node (across jobs), not the node index; Open MPI
    # exposes no node index, so it is informational here (block mapping assumed) and never used for devices.
    node_rank = rank // local_world if local_world < world else 0
    return DistEnv(
        rank, local_rank, world, local_world, addr, port, "openmpi", node_rank, max(1, -(-world // local_world))
    )


def _from_mpich(environ: Mapping[str, str]) -> DistEnv:
    if "PMI_SIZE" not in environ:
        raise LaunchEnvError("PMI_RANK is set but PMI_SIZE is missing; is this process started by mpiexec?")
    rank, world = _int(environ, "PMI_RANK"), _int(environ, "PMI_SIZE")
    local_rank = _int(environ, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in environ else 0
    local_world = _int(environ, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in environ else 1
    _check(rank, world, local_rank, local_world, ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
    addr, port = _master(environ)
    return DistEnv(rank, local_rank, world, local_world, addr, port, "mpich", 0, max(1, -(-world // local_world)))


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    if "SLURM_NTASKS" not in environ:
        raise LaunchEnvError(
            "SLURM_PROCID is set but SLURM_NTASKS is missing; start ranks with `srun --ntasks=N` "
            "(sbatch alone runs one batch shell, not N ranks)"
        )
    rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
    local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    node_id = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    tasks_text = environ.get("SLURM_TASKS_PER_NODE") or environ.get("SLURM_NTASKS_PER_NODE")
    per_node = expand_tasks_per_node(tasks_text) if tasks_text else [world]
    if sum(per_node) != world and len(per_node) > 1:
        raise LaunchEnvError(f"SLURM_TASKS_PER_NODE={tasks_text!r} sums to {sum(per_node)}, not SLURM_NTASKS={world}")
    local_world = per_node[node_id] if node_id < len(per_node) else per_node[-1]
    _check(
        rank, world, local_rank, local_world, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE")
    )
    addr, port = _master(environ)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if addr is None and nodelist:
        addr = expand_hostlist(nodelist)[0]
    if port is None:
        # Deterministic per job so that every task agrees without talking; avoids clashes between jobs.
        job = int(environ["SLURM_JOB_ID"]) if environ.get("SLURM_JOB_ID", "").isdigit() else 0
        port = 20000 + job % 20000
    return DistEnv(rank, local_rank, world, local_world, addr, port, "slurm", node_id, len(per_node))


def resolve_dist_env(environ: Mapping[str, str]) -> DistEnv:
    """Resolve rank / world / master from the launcher's variables.

    Precedence: torchrun (RANK/WORLD_SIZE/LOCAL_RANK, also under srun or mpirun), Open MPI, MPICH/Intel MPI,
    SLURM, then a single process. Raises LaunchEnvError naming the inconsistent variable."""
    if any(n in environ for n in _TORCHRUN):
        return _from_torchrun(environ)
    if "OMPI_COMM_WORLD_RANK" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        return _from_openmpi(environ)
    if "PMI_RANK" in environ:
        return _from_mpich(environ)
    if "SLURM_PROCID" in environ:
        return _from_slurm(environ)
    addr, port = _master(environ)
    return DistEnv(0, 0, 1, 1, addr or "127.0.0.1", port or DEFAULT_MASTER_PORT, "single")
