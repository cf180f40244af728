# The measured side of the memory model (parallel/memory_model.py): one real training step (forward, backward,
# AdamW step) of a parallelized model on this rank, its peak memory and the bytes it sent
# (parallel.all_traffic.count_all_traffic). Memory is what malloc has handed out and not taken back (glibc's mallinfo2,
# every thread and arena, heap and mmap), read after every op: collectives finish on gloo's threads, and frees
# there are invisible to torch's profiler, which would count their buffers as never freed. Used by
# bench/memory.py and tests/test_plan.py, from ranks they spawn.
from __future__ import annotations

import ctypes
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from cpdit.models.registry import family_of
from parallel.all_traffic import count_all_traffic
from parallel.comm import BYTES
from parallel.dims import ParallelDims
from parallel.parallelize import materialize, parallelize


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


_LIBC: list[ctypes.CDLL] = []


def malloc_live() -> int:
    """Bytes malloc has handed out and not taken back: heap chunks in use in every arena plus mmapped blocks
    (glibc >= 2.33)."""
    if not _LIBC:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        _LIBC.append(libc)
    info = _LIBC[0].mallinfo2()
    return info.uordblks + info.hblkhd


class MallocPeak(TorchDispatchMode):
    """`with MallocPeak() as m: ...` -> `m.peak`: the most malloc held after any op, above what it held at entry."""

    def __enter__(self):
        self.start = self.peak_live = malloc_live()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak_live = max(self.peak_live, malloc_live())
        return out

    @property
    def peak(self) -> int:
        return self.peak_live - self.start


def training_step(model, optimizer, latents: torch.Tensor, text: torch.Tensor, param_dtype: torch.dtype | None):
    """The step both sides of the memory models run (measured here, on fake tensors in parallel/fake_memory.py):
    forward under the job's autocast (`param_dtype`: bf16/fp16 training; None: fp32), a squared-output loss,
    backward, AdamW, gradients freed."""
    timesteps = torch.full((latents.shape[0],), 500.0)
    amp = torch.autocast("cpu", dtype=param_dtype or torch.bfloat16, enabled=param_dtype is not None)

    def step():
        with amp:
            out = model(latents, text, timesteps, return_local=True)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_step(
    cfg,
    dims: ParallelDims,
    latents: torch.Tensor,
    text: torch.Tensor,
    activation_checkpointing: str = "none",
    repeats: int = 3,
    param_dtype: torch.dtype | None = None,
) -> dict:
    """Collective. Build `cfg`'s model under `dims` (process group and mesh from the caller's ranks), take one
    AdamW step so the optimizer state exists, then measure `repeats` more: {"static": parameters + optimizer state
    this rank keeps, "peak": static + the median of the steps' peaks, "sent": bytes one step sent}. CPU, FSDP2 when
    dp x cp > 1; fp32, or with `param_dtype` FSDP2's mixed-precision policy and autocast in it (bf16 training)."""
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = family_of(cfg).model_class(cfg)
    parallelize(model, dims, mesh, activation_checkpointing=activation_checkpointing, param_dtype=param_dtype)
    materialize(model, "cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = training_step(model, optimizer, latents, text, param_dtype)
    step()
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    static = _local_bytes(model.parameters()) + _local_bytes(states)
    peaks = []
    for _ in range(repeats):
        dist.barrier()
        with MallocPeak() as probe:
            step()
        peaks.append(probe.peak)
    BYTES.reset()
    with count_all_traffic():
        step()
    return {"static": static, "peak": static + statistics.median(peaks), "sent": BYTES.sent}


def measure_layout(
    rank,
    world,
    cfg,
    work,
    cp: int,
    tp: int,
    ulysses: int,
    activation_checkpointing: str,
    out,
    param_dtype=None,
    dp_replicate: int = 1,
) -> None:
    """Spawnable (launch/spawn.py): `measure_step` of `cfg` on a seeded micro-batch of `work` (a
    parallel.memory_model.Workload) under cp x tp ranks; rank 0 writes every rank's result to `out` as JSON."""
    dims = ParallelDims(world, cp_size=cp, model_parallel_size=tp, ulysses_size=ulysses, dp_replicate=dp_replicate)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(work.batch, work.frames, cfg.in_channels, work.height, work.width, generator=g)
    text = torch.randn(work.batch, work.text_len, cfg.text_embed_dim, generator=g)
    row = measure_step(cfg, dims, latents, text, activation_checkpointing, param_dtype=param_dtype)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
