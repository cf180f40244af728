# Everything else on the wire, for the benchmarks and the planner's measured side: inside `count_all_traffic()` the
# collectives torch issues itself (FSDP2's c10d calls, DTensor's functional collectives) are added to parallel.comm's
# byte counter (BYTES), with the ring-algorithm byte counts parallel/comm.py uses for its own. It wraps functions of
# torch.distributed for its duration; parallel/comm.py's helpers call c10d directly, past the wrappers, and count
# themselves (so nothing is counted twice).
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.comm import BYTES, _nbytes


def _ring_bytes(kind: str, nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring collective over n ranks; `nbytes` is this rank's input."""
    if n <= 1:
        return 0
    return {
        "all_reduce": 2 * (n - 1) * nbytes // n,
        "all_gather": (n - 1) * nbytes,
        "reduce_scatter": (n - 1) * nbytes // n,
        "all_to_all": (n - 1) * nbytes // n,
    }[kind]


_FUNCTIONAL = {
    "all_reduce": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}


class _FunctionalCollectiveBytes(TorchDispatchMode):
    """Counts DTensor's functional collectives (torch.ops._c10d_functional.*) as they are dispatched."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _FUNCTIONAL.get(func._schema.name.split("::")[-1]) if func.namespace == "_c10d_functional" else None
        if kind is not None:
            group = _resolve_process_group(args[-1])
            BYTES.sent += _ring_bytes(kind, _nbytes(args[0]), dist.get_world_size(group))
        return func(*args, **(kwargs or {}))


@contextmanager
def count_all_traffic():
    """Within it, BYTES also counts what this module does not issue: FSDP2's all-gathers and reduce-scatters, other
    c10d all-reduces (HSDP's replica all-reduce, the job's loss) and DTensor's tensor-parallel collectives. For the
    benchmarks; the wrappers cost a Python call per collective."""
    wrapped = {  # name -> (ring collective, the argument holding this rank's input); this module's calls bypass them
        "all_gather_single": ("all_gather", "input_tensor"),
        "reduce_scatter_single": ("reduce_scatter", "input"),
        "all_reduce": ("all_reduce", "tensor"),
    }
    originals = {name: getattr(dist, name) for name in wrapped}

    def counted(name: str):
        kind, tensor = wrapped[name]
        signature = inspect.signature(originals[name])

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            BYTES.sent += _ring_bytes(kind, _nbytes(bound[tensor]), dist.get_world_size(bound.get("group")))
            return originals[name](*args, **kwargs)

        return call

    for name in wrapped:
        setattr(dist, name, counted(name))
    try:
        with _FunctionalCollectiveBytes():
            yield BYTES
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
