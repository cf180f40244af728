# A model built on the meta device and parallelized like the job does, and the check that its local output and
# every parameter gradient equal a single-process reference (float64).
import torch

from parallel.dims import ParallelDims
from parallel.parallelize import materialize, parallelize
from parallel.state import full_tensor

TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_TOL = dict(rtol=1e-9, atol=1e-10)


def build_parallel(
    model_cls, config, world, cp, tp, *, layout="contiguous", attention="auto", ac="none", seed=3, compile=False
):
    """(model, dims, mesh): FSDP2 over dp x cp, frames over cp, heads over tp; float64, initialised from `seed`;
    `compile`: compiled blocks (train.compile)."""
    dims = ParallelDims(world, cp_size=cp, model_parallel_size=tp)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = model_cls(config).to(torch.float64)
    parallelize(
        model,
        dims,
        mesh,
        layout=layout,
        attention=attention,
        reduce_dtype=None,
        activation_checkpointing=ac,
        compile=compile,
    )
    materialize(model, "cpu", seed=seed)
    return model, dims, mesh


def dp_slice(dims: ParallelDims, rank: int, batch: int) -> slice:
    per = batch // dims.dp
    return slice(dims.dp_rank(rank) * per, (dims.dp_rank(rank) + 1) * per)


def check_output_and_grads(model, dims, bound, out, out_ref, weight, ref_grads) -> None:
    """`out`: this rank's frames of its batch slice; `out_ref`/`weight`: the reference output and loss weights of
    that slice (all frames). Backward of this rank's share of sum(out * weight), then every full gradient."""
    torch.testing.assert_close(out, bound.shard_frames(out_ref.detach(), 1), **TOL)
    ((out * bound.shard_frames(weight, 1)).sum() * dims.dp).backward()  # mean over dp -> the global sum
    for n, p in model.named_parameters():
        torch.testing.assert_close(full_tensor(p.grad), ref_grads[n], **GRAD_TOL, msg=n)
