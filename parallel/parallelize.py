# The one place where parallelism is applied to cpdit modules, in a fixed order: tensor parallel (the family's
# plan) -> context parallel (the sequence seam) -> activation checkpointing (wrapping blocks from outside) ->
# compile -> FSDP2 (or a plain gradient all-reduce), then the trainable text encoder's data parallelism and the
# first stage's context parallelism. `parallelize_job` returns the handle the training job uses for what it needs.
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable import checkpoint

from cpdit.models.registry import family_of
from parallel.cp_sequence import ContextParallelSequence
from parallel.dims import ParallelDims, ParallelMesh
from parallel.fsdp import apply_fsdp, apply_grad_allreduce, shard_module
from parallel.state import assign_full
from parallel.tensor_parallel import apply_tensor_parallel

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
    head_chunks: int | None = None,
) -> nn.Module:
    """Apply every parallelism of `dims` to a model of a registered family (built on the meta device or
    materialised) in place.

    After it, `model(latents, text_embeds, timesteps)` takes the full inputs (identical on the ranks of one cp x tp
    group) and returns the full output; `return_local=True` returns this rank's frames. Gradients: each rank's
    loss must be its share of its data-parallel replica's mean loss (e.g. the sum over its own frames divided by
    the replica's element count); parameter gradients are then summed over cp and averaged over dp, which equals
    the single-process gradient of the global-batch mean loss. Call `materialize` next if built on meta.
    """
    if activation_checkpointing not in AC_MODES:
        raise ValueError(f"activation_checkpointing={activation_checkpointing!r} is not one of {list(AC_MODES)}")
    if dims.model_parallel_size > 1:
        apply_tensor_parallel(model, mesh["tp"], dict(family_of(model).tp_plan))
    if dims.cp_size > 1:
        model.sequence = ContextParallelSequence(mesh.cp_mesh(), attention, layout, head_chunks)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:  # regional: each block on its own (one compiled graph serves every block of the same shapes)
        for block in model.blocks:
            block.compile()
    apply_data_parallel(model, dims, mesh, fsdp, param_dtype, reduce_dtype, per_block=True)
    return model


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute blocks in the backward instead of keeping their activations: every block ("full") or every other
    one ("selective"). Applied from outside (hooks on the block modules, torch.distributed._composable.checkpoint):
    parameter names, and so initial values and checkpoints, do not change."""
    every = AC_MODES[mode]
    for i, block in enumerate(model.blocks):
        if every and i % every == 0:
            checkpoint(block)


def apply_data_parallel(
    module: nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh,
    fsdp: bool,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    per_block: bool = False,
) -> None:
    """Gradients summed over cp and averaged over dp: FSDP2 (HSDP when replicated) over dp x cp, per block and root
    (`per_block`) or as one unit, or without FSDP a flat all-reduce once per step (parallel/fsdp.py). `param_dtype`
    is FSDP2's all-gather dtype (parallel.fsdp.precision_policy); without FSDP the parameters stay as they are
    (autocast computes in bf16 from them)."""
    if dims.size("dp_cp") == 1:
        return
    if fsdp and (dims.size("dp_shard_cp") > 1 or dims.dp_replicate > 1):
        if per_block:
            apply_fsdp(module, mesh.fsdp_mesh(), dims.cp, param_dtype, reduce_dtype)
        else:  # its gradients pass through the model's output-gradient scaling: FSDP's plain average suffices
            shard_module(module, mesh.fsdp_mesh(), reduce_dtype, param_dtype)
    else:
        apply_grad_allreduce(module, mesh.get_group("dp_cp"), dims.dp)


def parallelize_first_stage(stage, dims: ParallelDims, mesh: ParallelMesh, cp_size: int | None = None):
    """The frozen first stage over the model's cp group (`cp_size` None: the model's cp; 1: every rank encodes the
    whole clip). A PixelStage has nothing to split."""
    from cpdit.first_stage import VAEStage

    cp = dims.cp if cp_size is None else cp_size
    if not isinstance(stage, VAEStage) or cp == 1:
        return stage
    from parallel.vae_stage import ContextParallelVAE

    return ContextParallelVAE(stage, mesh.get_group("cp"))


@dataclass
class Parallelized:
    """What the training job needs to know of the layout, after `parallelize_job`."""

    dims: ParallelDims
    mesh: ParallelMesh
    model: nn.Module
    first_stage: object

    def local_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """A full-video tensor (..., T, ...) -> the frames of the model's `return_local=True` output (loss targets,
        per-frame noise levels). A model patching `frames_per_patch` frames together (CogVideoX 1.5) is split in
        whole groups."""
        g = self.model.frames_per_patch
        grouped = x.unflatten(dim, (x.shape[dim] // g, g))
        return self.model.sequence.frames(x.shape[dim] // g).shard_frames(grouped, dim).flatten(dim, dim + 1)

    def cp_degree(self, c: int | None):
        """A context in which the model runs at cp degree `c` (parallel/dynamic_cp.py; None or cp_size: the full
        group)."""
        from contextlib import nullcontext

        if c is None or c == self.dims.cp:
            return nullcontext()
        return self.model.sequence.use(c)

    def holds_first_frame(self, num_frames: int) -> bool:
        """Whether this rank's frames of a clip of `num_frames` latent frames (before CogVideoX 1.5's padding)
        include frame 0 (contiguous and zigzag layouts alike)."""
        g = self.model.frames_per_patch
        frames = self.model.sequence.frames(-(-num_frames // g))
        return 0 in frames.frame_ids(torch.device("cpu")).tolist()

    @property
    def local_first_stage(self):
        """The first stage as this rank alone runs it (the context-parallel VAE's own stage): for encoding what
        only this rank needs, without a collective."""
        from parallel.vae_stage import ContextParallelVAE

        return self.first_stage.stage if isinstance(self.first_stage, ContextParallelVAE) else self.first_stage

    @property
    def first_stage_group(self) -> dist.ProcessGroup | None:
        """The group whose ranks share one encoding (the latent cache's), or None when each rank encodes alone."""
        return getattr(self.first_stage, "group", None)

    def is_writer(self, rank: int) -> bool:
        """ParallelDims.is_writer: one rank per replica writes what the replica shares."""
        return self.dims.is_writer(rank)


def parallelize_job(
    model: nn.Module,
    text: nn.Module | None,
    dims: ParallelDims,
    mesh: ParallelMesh,
    *,
    first_stage=None,
    first_stage_cp: int | None = None,
    activation_checkpointing: str = "none",
    fsdp: bool = True,
    attention: str = "auto",
    layout: str = "contiguous",
    head_chunks: int | None = None,
    param_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> Parallelized:
    """`parallelize` the DiT, data-parallelize a trainable text encoder like it (FSDP2 as one unit, or the plain
    all-reduce), and put the first stage on the cp group. `param_dtype`: FSDP2's all-gather dtype for both (bf16 or
    fp16 training; fp32 master weights, fp32 gradient reduction)."""
    parallelize(
        model,
        dims,
        mesh,
        activation_checkpointing=activation_checkpointing,
        fsdp=fsdp,
        attention=attention,
        layout=layout,
        head_chunks=head_chunks,
        param_dtype=param_dtype,
        compile=compile,
    )
    if text is not None:
        apply_data_parallel(text, dims, mesh, fsdp, param_dtype)
    stage = parallelize_first_stage(first_stage, dims, mesh, first_stage_cp) if first_stage is not None else None
    return Parallelized(dims, mesh, model, stage)


def materialize(model: nn.Module, device: torch.device | str, seed: int = 0) -> nn.Module:
    """Allocate a meta-built, parallelized model on `device` and initialise it (each rank keeps its shards)."""
    model.to_empty(device=device)
    model.init_weights(seed, assign=assign_full)
    return model
