# The one place where parallelism is applied to a cpdit model, in a fixed order:
# tensor parallel -> context parallel -> activation checkpointing -> compile -> FSDP2.
from __future__ import annotations

import torch
import torch.nn as nn

from cpdit.factorized_dit import FactorizedDiT
from cpdit.phenaki_dit import PhenakiDiT
from parallel.context import ContextParallel
from parallel.dims import ParallelDims, ParallelMesh
from parallel.fsdp import apply_fsdp, apply_grad_allreduce
from parallel.state import assign_full
from parallel.tensor_parallel import (
    apply_factorized_tensor_parallel,
    apply_phenaki_tensor_parallel,
    apply_tensor_parallel,
)

AC_MODES = {"none": 0, "full": 1, "selective": 2}  # selective: every other block


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh,
    *,
    activation_checkpointing: str = "none",
    fsdp: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    compile: bool = False,
    attention: str = "auto",
    layout: str = "contiguous",
    causal: bool = False,
    head_chunks: int | None = None,
) -> nn.Module:
    """Apply every parallelism of `dims` to a CPDiT (built on the meta device or materialised) in place.

    After it, `model(latents, text_embeds, timesteps)` takes the full inputs (identical on the ranks of one cp x tp
    group) and returns the full output; `return_local=True` returns this rank's frames. Gradients: each rank's
    loss must be its share of its data-parallel replica's mean loss (e.g. the sum over its own frames divided by
    the replica's element count); parameter gradients are then summed over cp and averaged over dp, which equals
    the single-process gradient of the global-batch mean loss. Call `materialize` next if built on meta.
    """
    if activation_checkpointing not in AC_MODES:
        raise ValueError(f"activation_checkpointing={activation_checkpointing!r} is not one of {list(AC_MODES)}")
    if dims.tp_enabled:
        if isinstance(model, FactorizedDiT):
            apply_factorized_tensor_parallel(model, mesh["tp"])
        elif isinstance(model, PhenakiDiT):
            apply_phenaki_tensor_parallel(model, mesh["tp"])
        else:
            apply_tensor_parallel(model, mesh["tp"])
    if dims.cp_enabled:
        model.context = ContextParallel(mesh.cp_mesh(), attention, layout, causal, head_chunks)
    model.gradient_checkpointing = AC_MODES[activation_checkpointing]
    if compile:
        for block in model.blocks:
            block.compile()
    if fsdp and dims.size("dp_cp") > 1 and (dims.size("dp_shard_cp") > 1 or dims.dp_replicate > 1):
        apply_fsdp(model, mesh.fsdp_mesh(), dims.cp, param_dtype, reduce_dtype)  # FSDP2, or HSDP when replicated
    elif dims.size("dp_cp") > 1:
        apply_grad_allreduce(model, mesh.get_group("dp_cp"), dims.dp)
    return model


def materialize(model: nn.Module, device: torch.device | str, seed: int = 0) -> nn.Module:
    """Allocate a meta-built, parallelized model on `device` and initialise it (each rank keeps its shards)."""
    model.to_empty(device=device)
    model.init_weights(seed, assign=assign_full)
    return model
