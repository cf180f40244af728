# Per-rank memory of one training step predicted by running the job's own code with no data and no peers: the real
# `parallelize` (tensor parallel DTensors, the context-parallel sequence seam with its ring P2P and Ulysses
# all-to-alls, activation checkpointing, FSDP2 with its mixed-precision policy) on a fake process group of the
# layout's world size, the model's tensors fake (torch._subclasses.FakeTensorMode: shapes, dtypes and devices only),
# and torch's FSDPMemTracker counting what is alive after every op through one forward, backward and AdamW step
# under the job's autocast. torchtitan estimates memory the same way; unlike parallel/memory_model.py it needs no
# second implementation of TP sharding or FSDP2, so any mixed-precision policy is modelled as it runs.
# bench/memory.py measures the same step for real and compares.
from __future__ import annotations

import gc
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist

from cpdit.models.registry import family_of
from parallel.dims import ParallelDims
from parallel.fsdp import adamw_foreach
from parallel.memory_probe import training_step
from parallel.parallelize import parallelize


def _step_peak(cfg, work, dims: ParallelDims, ac: str, param_dtype, fsdp: bool, foreach: bool) -> dict[str, int]:
    """One rank's peak over a forward + backward + AdamW step (after a first step creates the optimizer state), by
    category (FSDPMemTracker's: parameters, buffers, gradients, activations, temporaries, optimizer state...)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world_size)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # our root returns a view: no in-place use
    try:
        mesh = dims.build_mesh("cpu")  # device meshes hold real rank tensors: built before the fake mode
        with torch.device("meta"):
            model = family_of(cfg).model_class(cfg)
        parallelize(model, dims, mesh, activation_checkpointing=ac, fsdp=fsdp, param_dtype=param_dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            params = list(model.parameters())
            optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=adamw_foreach(params, foreach))
            b = work.batch
            latents = torch.empty(b, work.frames, cfg.in_channels, work.height, work.width)
            text = torch.empty(b, work.text_len, cfg.text_embed_dim)
            step = training_step(model, optimizer, latents, text, param_dtype)
            step()  # the optimizer state exists from here on, as in every step but the first
            if isinstance(model, FSDPModule):
                tracker = FSDPMemTracker(model, optimizer)
            else:  # one replica of the whole model (no FSDP): the plain tracker
                tracker = MemTracker()
                tracker.track_external(model, optimizer)
            with tracker:
                step()
            peak = tracker.get_tracker_snapshot("peak")
        stats = next(iter(peak.values()))
        return {str(k): int(v) for k, v in stats.items()}
    finally:
        del mesh
        dist.destroy_process_group()
        gc.collect()


def fake_step_memory(
    cfg,
    work,
    dims: ParallelDims,
    activation_checkpointing: str = "none",
    *,
    param_dtype: torch.dtype | None = None,
    fsdp: bool = True,
    foreach: bool = True,
) -> dict[str, int]:
    """Per-rank peak bytes of one training step of `cfg` on `work` (parallel.memory_model.Workload) under `dims`:
    {"total", and by what holds them: "params", "grads", "optimizer", "activations", "fsdp_buffers" (all-gather and
    reduce-scatter buffers), "temporaries"}. The blocks are identical: a deep model is run with 3 and 4 blocks and
    extrapolated linearly (CogVideoX-5B, cp2 x tp4 with full checkpointing: 21.5 GiB extrapolated, 21.6 run at its
    42 blocks; from 2 and 3 blocks, where the peak falls in another phase of the step, 24.2). `param_dtype`: FSDP2's
    all-gather dtype with autocast on (bf16 training); `foreach`: AdamW's multi-tensor step (CUDA's default) or
    per-tensor (CPU's)."""
    if dist.is_initialized():
        raise RuntimeError("fake_step_memory runs its own fake process group: call it outside a distributed job")
    args = (work, dims, activation_checkpointing, param_dtype, fsdp, foreach)
    if cfg.num_layers <= 4:
        return _grouped(_step_peak(cfg, *args))
    three, four = (_grouped(_step_peak(replace(cfg, num_layers=n), *args)) for n in (3, 4))
    return {k: four[k] + (cfg.num_layers - 4) * (four[k] - three[k]) for k in four}


GROUPS = {  # FSDPMemTracker's and MemTracker's categories (by name) -> ours
    "PARAM": "params",
    "BUFFER": "params",
    "GRAD": "grads",
    "OPT": "optimizer",
    "ACT": "activations",
    "INP": "activations",
    "ALL_GATHER": "fsdp_buffers",
    "REDUCE_SCATTER": "fsdp_buffers",
    "TEMP": "temporaries",
}


def _grouped(stats: dict[str, int]) -> dict[str, int]:
    """The tracker's categories summed into ours, with the total."""
    out = dict.fromkeys(("params", "grads", "optimizer", "activations", "fsdp_buffers", "temporaries"), 0)
    for name, nbytes in stats.items():
        if name != "Total":
            kind = name.rsplit(".", 1)[-1]
            out[next((g for key, g in GROUPS.items() if kind.endswith(key)), "temporaries")] += nbytes
    out["total"] = stats["Total"]
    return out
