# Topology of a cpdit run: validates the parallel degrees, names the mesh axes, builds the DeviceMesh,
# and answers "which coordinate is rank r on each axis" as a pure function (testable without processes).
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpdit.seeding import derive_seed

if TYPE_CHECKING:
    from datetime import timedelta

    from torch.distributed.device_mesh import DeviceMesh

# Outermost first (DeviceMesh order). Adjacent ranks differ in `tp` first, then `cp_ulysses`, ...
MESH_DIMS: tuple[str, ...] = ("dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp")
# Flattened views built on top of the 5-D mesh: name -> the dims they merge.
FLAT_DIMS: dict[str, tuple[str, ...]] = {
    "cp": ("cp_ring", "cp_ulysses"),
    "dp_shard_cp": ("dp_shard", "cp_ring", "cp_ulysses"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp_ring", "cp_ulysses"),
}


class TopologyError(ValueError):
    """An impossible combination of parallel degrees; the message names the knob and the fix."""


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{name}={value!r} must be a positive integer")
    if value < 1:
        raise TopologyError(f"{name}={value} must be >= 1")
    return value


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every parallelism of one run.

    Args:
        world_size: total number of ranks.
        cp_size: context-parallel degree (frames of a video split over this many ranks),
            `= ulysses_size * ring_size`.
        model_parallel_size: tensor-parallel degree (attention heads / MLP columns split).
        ulysses_size: the part of `cp_size` done with all-to-all (Ulysses); the rest is ring attention.
        dp_replicate: number of model replicas (HSDP outer dim); data parallel shards take the rest.
    """

    world_size: int
    cp_size: int = 1
    model_parallel_size: int = 1
    ulysses_size: int = 1
    dp_replicate: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "cp_size", "model_parallel_size", "ulysses_size", "dp_replicate"):
            _check_positive(name, getattr(self, name))
        validate_degrees(self.cp_size, self.model_parallel_size, self.ulysses_size)
        inner = self.cp_size * self.model_parallel_size
        if self.world_size % inner:
            raise TopologyError(
                f"cp_size={self.cp_size} x model_parallel_size={self.model_parallel_size} = {inner} does not "
                f"divide world_size={self.world_size}; choose degrees whose product divides the number of "
                f"processes (e.g. launch {inner * max(1, self.world_size // inner)} processes)"
            )
        if self.world_size % (inner * self.dp_replicate):
            raise TopologyError(
                f"dp_replicate={self.dp_replicate} does not divide world_size / (cp_size x "
                f"model_parallel_size) = {self.world_size // inner}; pick a divisor of it"
            )

    # ---- derived degrees -------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.model_parallel_size

    @property
    def cp(self) -> int:
        return self.cp_size

    @property
    def ring_size(self) -> int:
        return self.cp_size // self.ulysses_size

    @property
    def dp_shard(self) -> int:
        return self.world_size // (self.dp_replicate * self.cp_size * self.model_parallel_size)

    @property
    def dp(self) -> int:
        """Number of distinct data streams (replicas x shards)."""
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        """Mesh shape in MESH_DIMS order (outermost first)."""
        return (self.dp_replicate, self.dp_shard, self.ring_size, self.ulysses_size, self.tp)

    def size(self, dim: str) -> int:
        """Size of a mesh dim or of a flattened view (`cp`, `dp_shard_cp`, `dp_cp`)."""
        if dim in MESH_DIMS:
            return self.shape[MESH_DIMS.index(dim)]
        if dim in FLAT_DIMS:
            out = 1
            for d in FLAT_DIMS[dim]:
                out *= self.size(d)
            return out
        raise KeyError(f"unknown mesh dim {dim!r}; known: {MESH_DIMS + tuple(FLAT_DIMS)}")

    def is_writer(self, rank: int) -> bool:
        """The rule, the only one: the rank of each data-parallel replica that writes what the replica shares
        (its samples, its files): cp rank 0 and tp rank 0."""
        coords = self.coords(rank)
        return coords["cp"] == 0 and coords["tp"] == 0

    @classmethod
    def from_config(cls, parallel, world_size: int) -> ParallelDims:
        """The degrees a job's `parallel:` section (launch/config.py ParallelConfig, or anything with its fields)
        asks for on `world_size` ranks: the one place a config becomes a ParallelDims."""
        p = parallel
        return cls(world_size, p.cp_size, p.model_parallel_size, p.ulysses_size, p.dp_replicate)

    # ---- coordinates (pure) ----------------------------------------------------------------------
    def coords(self, rank: int) -> dict[str, int]:
        """Coordinate of `rank` on every mesh dim and flattened view (row-major, `tp` innermost)."""
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank={rank} outside world_size={self.world_size}")
        out: dict[str, int] = {}
        rest = rank
        for name, n in zip(reversed(MESH_DIMS), reversed(self.shape), strict=True):
            out[name] = rest % n
            rest //= n
        for flat, dims in FLAT_DIMS.items():
            idx = 0
            for d in dims:
                idx = idx * self.size(d) + out[d]
            out[flat] = idx
        return out

    def dp_rank(self, rank: int) -> int:
        """Index of the data stream `rank` belongs to (0 .. dp-1)."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def draw_seed(self, seed: int, rank: int, step: int, index: int) -> int:
        """The RNG policy, the only one: the seed of random draw `index` of optimizer step `step` on `rank`. Identical
        on the cp and tp ranks of one replica (noise, timesteps and conditioning dropout must agree inside a cp x tp
        group), distinct across data-parallel ranks, steps and indices (a sample of the step's accumulated batch, or
        a stream such as the first stage's posterior samples)."""
        dp_rank = self.dp_rank(rank)
        return derive_seed(seed, "draw", dp_rank, step, index)

    def describe(self) -> str:
        return (
            f"world={self.world_size} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} "
            f"cp={self.cp_size} (ring={self.ring_size} x ulysses={self.ulysses_size}) "
            f"tp={self.model_parallel_size}"
        )

    # ---- mesh --------------------------------------------------------------------------------------
    def build_mesh(self, device_type: str = "cpu", timeout: timedelta | None = None) -> ParallelMesh:
        """The 5-D DeviceMesh over MESH_DIMS plus the flattened views in FLAT_DIMS. `timeout` bounds every collective
        of every group of the mesh (DeviceMesh creates its groups with c10d's default, 30 minutes for gloo, whatever
        the world group's timeout; the job passes dist.timeout_s).

        Every rank must call this, in the same order as every other collective set-up."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.distributed_c10d import _set_pg_timeout

        root = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        flat = {name: root[dims]._flatten(name) for name, dims in FLAT_DIMS.items()}
        if self.dp_replicate > 1:  # HSDP: replicate over dp_replicate, shard over dp_shard x cp
            with warnings.catch_warnings():  # torch deprecates slicing a flattened dim out of the root
                warnings.simplefilter("ignore")
                flat["hsdp"] = root["dp_replicate", "dp_shard_cp"]
        mesh = ParallelMesh(root, flat)
        if timeout is not None:
            for group in mesh.groups():
                _set_pg_timeout(timeout, group)
        return mesh


@dataclass(frozen=True)
class ParallelMesh:
    """The root DeviceMesh and its flattened views, kept by us (torch deprecates slicing flattened dims out
    of the root). `mesh["tp"]`, `mesh["cp_ring", "cp_ulysses"]` and `mesh["cp"]` are DeviceMeshes."""

    root: DeviceMesh
    flat: dict[str, DeviceMesh]

    def __getitem__(self, name: str | tuple[str, ...]) -> DeviceMesh:
        if isinstance(name, str) and name in self.flat:
            return self.flat[name]
        return self.root[name]

    def get_group(self, name: str):
        return self[name].get_group()

    def groups(self) -> list:
        """Every process group this rank belongs to through the mesh (each dim of the root and of every view)."""
        out = []
        for m in (self.root, *self.flat.values()):
            out += [g for g in m.get_all_groups() if all(g is not h for h in out)]
        return out

    @property
    def device_type(self) -> str:
        return self.root.device_type

    def fsdp_mesh(self) -> DeviceMesh:
        """What FSDP2 shards over: the 1-D dp_shard x cp view, or the 2-D (dp_replicate, dp_shard x cp) mesh
        (HSDP: parameters sharded inside a replica, gradients all-reduced across replicas) when dp_replicate > 1."""
        return self.flat["hsdp"] if "hsdp" in self.flat else self.flat["dp_shard_cp"]

    def cp_mesh(self) -> DeviceMesh:
        """The 2-D (cp_ring, cp_ulysses) sub-mesh that sequence plans and attention take."""
        return self.root["cp_ring", "cp_ulysses"]


def validate_degrees(cp_size: int, model_parallel_size: int, ulysses_size: int) -> None:
    """Checks that need no world size (config load time)."""
    _check_positive("cp_size", cp_size)
    _check_positive("model_parallel_size", model_parallel_size)
    _check_positive("ulysses_size", ulysses_size)
    if cp_size % ulysses_size:
        divisors = [d for d in range(1, cp_size + 1) if cp_size % d == 0]
        raise TopologyError(
            f"ulysses_size={ulysses_size} does not divide cp_size={cp_size}; "
            f"use one of {divisors} (ring attention takes cp_size / ulysses_size)"
        )
