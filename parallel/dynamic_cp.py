# A context-parallel degree per batch (parallel.dynamic_cp): a cp group of cp ranks runs a batch of short clips as
# cp/c sub-groups of c ranks, each over its own samples, instead of splitting every clip over all cp ranks. The
# sub-groups' meshes are made once at start-up; the model's sequence seam switches between them per batch. Tensor
# parallelism and FSDP2's groups do not change, and neither does the gradient rule: each rank's loss is its share
# of its replica's mean (now over the samples of its own sub-group), so the reduction over dp x cp sums exactly the
# replica's samples' gradients.
#
# Sub-group k of degree c holds the flattened cp indices [k*c, (k+1)*c) (cp index = ring rank * ulysses_size +
# ulysses rank): for c dividing ulysses_size a sub-group is c ranks of one Ulysses group (its all-to-alls stay where
# the full group's ran, inside a node); for ulysses_size dividing c it is c / ulysses_size ring positions of whole
# Ulysses groups. Other degrees are refused.
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from cpdit.sequence import LocalSequence
from parallel.cp_sequence import ContextParallelSequence
from parallel.dims import MESH_DIMS, ParallelDims, TopologyError

if TYPE_CHECKING:
    from datetime import timedelta

    from torch.distributed.device_mesh import DeviceMesh


def cp_degrees(dims: ParallelDims) -> list[int]:
    """The degrees a batch can run at under dims' cp group, ascending: the divisors c of cp_size for which c divides
    ulysses_size or ulysses_size divides c."""
    cp, u = dims.cp, dims.ulysses_size
    return [c for c in range(1, cp + 1) if cp % c == 0 and (u % c == 0 or c % u == 0)]


def check_degree(dims: ParallelDims, c: int, knob: str = "parallel.cp_per_bucket") -> None:
    if c not in cp_degrees(dims):
        raise TopologyError(
            f"{knob}: a cp degree of {c} cannot split cp_size={dims.cp} (ulysses_size={dims.ulysses_size}); "
            f"use one of {cp_degrees(dims)}"
        )


def sub_shape(dims: ParallelDims, c: int) -> tuple[int, int]:
    """(ring, ulysses) of a sub-group of degree c."""
    check_degree(dims, c)
    u = dims.ulysses_size
    return (1, c) if u % c == 0 else (c // u, u)


def sub_strategy(strategy: str, ring: int, ulysses: int) -> str:
    """The attention strategy of a sub-group: USP degenerates to its one remaining axis."""
    if strategy == "usp" and (ring == 1 or ulysses == 1):
        return "ring" if ulysses == 1 else "ulysses"
    return strategy


def sub_group_index(dims: ParallelDims, rank: int, c: int) -> tuple[int, int]:
    """(sub-group k, its count cp / c) of `rank` at degree c: the ranks of sub-group k take the k-th share of their
    replica's micro-batch."""
    return dims.coords(rank)["cp"] // c, dims.cp // c


def build_sub_mesh(dims: ParallelDims, c: int, device_type: str, timeout: timedelta | None = None) -> DeviceMesh:
    """Collective over the world. The 2-D (cp_ring, cp_ulysses) mesh of this rank's sub-group of degree c (1 < c <
    cp), whose groups every sequence plan and attention call of that degree takes."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.distributed_c10d import _set_pg_timeout

    ring, uly = sub_shape(dims, c)
    rep, shard, _, _, tp = dims.shape
    assert MESH_DIMS == ("dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp")
    # world ranks in their mesh order, the cp axis cut into (cp / c, ring, ulysses); every other axis outermost
    ranks = torch.arange(dims.world_size).reshape(rep, shard, dims.cp // c, ring, uly, tp)
    ranks = ranks.permute(0, 1, 2, 5, 3, 4).reshape(-1, ring, uly)
    mesh = DeviceMesh(device_type, ranks, mesh_dim_names=("cp_sub_others", "cp_ring", "cp_ulysses"))
    sub = mesh["cp_ring", "cp_ulysses"]
    if timeout is not None:
        for group in sub.get_all_groups():
            _set_pg_timeout(timeout, group)
    return sub


class DynamicCPSequence:
    """The sequence seam with a cp degree per batch: `seam.use(c)` makes every bind of the model (and the job's
    `local_frames`) the sub-group's of degree c until it exits. Degree cp is the full group; 1 is no cp at all."""

    def __init__(
        self,
        dims: ParallelDims,
        full: ContextParallelSequence,
        degrees: list[int],
        timeout: timedelta | None = None,
    ):
        self.dims, self.degree = dims, dims.cp
        self.seams: dict[int, object] = {dims.cp: full}
        for c in sorted(set(degrees)):  # every rank builds every degree's mesh, in the same order
            check_degree(dims, c)
            if c == 1:
                self.seams[c] = LocalSequence()
            elif c != dims.cp:
                ring, uly = sub_shape(dims, c)
                mesh = build_sub_mesh(dims, c, full.cp_mesh.device_type, timeout)
                strategy = sub_strategy(full.strategy, ring, uly)
                self.seams[c] = ContextParallelSequence(mesh, strategy, full.layout, full.head_chunks)

    @property
    def degrees(self) -> list[int]:
        return sorted(self.seams)

    @contextmanager
    def use(self, c: int):
        if c not in self.seams:
            raise ValueError(f"cp degree {c} was not built at start-up (built: {self.degrees})")
        before, self.degree = self.degree, c
        try:
            yield self.seams[c]
        finally:
            self.degree = before

    def bind(self, num_frames: int, tokens_per_frame: int, text_len: int):
        return self.seams[self.degree].bind(num_frames, tokens_per_frame, text_len)

    def frames(self, num_frames: int):
        return self.seams[self.degree].frames(num_frames)


def enable_dynamic_cp(model, dims: ParallelDims, degrees: list[int], timeout: timedelta | None = None):
    """Collective. Give a parallelized model (cp_size > 1) a DynamicCPSequence over `degrees`; returns it."""
    if not isinstance(model.sequence, ContextParallelSequence):
        raise ValueError("dynamic cp needs a model parallelized with cp_size > 1")
    model.sequence = DynamicCPSequence(dims, model.sequence, degrees, timeout)
    return model.sequence
