# Every collective that moves activations or gradients, over explicit groups: all-to-all (Ulysses, the axis switch,
# frame resharding), ring P2P (ring attention), halo P2P and sharded-statistics all-reduces (the VAE), the
# tensor-parallel copy of shared parameters, and all-reduces/all-gathers of gradients and frames. Each one adds what
# this rank sends to the byte counter (BYTES) and records itself in the collective trace (parallel/progress.py) the
# hang watchdog reads. FSDP2's and DTensor's own collectives run inside torch: parallel/all_traffic.py's
# `count_all_traffic()` adds them to the counter for the benchmarks. gloo needs contiguous tensors for P2P and
# all_to_all_single; every helper here makes them so.
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from parallel.progress import in_collective


@dataclass
class ByteCounter:
    """Bytes this rank put on the wire (self-sends excluded), counted where collectives are issued."""

    sent: int = 0

    def reset(self) -> None:
        self.sent = 0


BYTES = ByteCounter()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all_tensors(
    sends: list[torch.Tensor], recv_shapes: list[tuple[int, ...]], group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Send `sends[j]` to group member j; return the tensors received from every member (shapes given).

    Shapes may differ per member (uneven frames or heads): one `all_to_all_single` on flat buffers with
    element-count splits. All sends share one dtype/device."""
    world = len(sends)
    me = dist.get_rank(group)
    if world == 1:
        return [sends[0].reshape(recv_shapes[0])]
    ref = sends[0]
    send_buf = torch.cat([s.reshape(-1) for s in sends])  # contiguous 1-D
    recv_numels = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv_buf = torch.empty(sum(recv_numels), dtype=ref.dtype, device=ref.device)
    in_splits = [s.numel() for s in sends]
    with in_collective("all_to_all_single"):
        dist.all_to_all_single(recv_buf, send_buf, recv_numels, in_splits, group=group)
    BYTES.sent += sum(_nbytes(s) for j, s in enumerate(sends) if j != me)
    return [chunk.view(shape) for chunk, shape in zip(recv_buf.split(recv_numels), recv_shapes, strict=True)]


def ring_exchange(
    send: torch.Tensor, recv_shape: tuple[int, ...], group: dist.ProcessGroup, tag: int = 0
) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next ring member and receiving a `recv_shape` tensor from the previous one.
    Returns (receive buffer, requests); wait on the requests before reading the buffer."""
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % world)
    prv = dist.get_global_rank(group, (me - 1) % world)
    send = send.contiguous()
    recv = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
    ops = [dist.P2POp(dist.isend, send, nxt, group, tag), dist.P2POp(dist.irecv, recv, prv, group, tag)]
    reqs = dist.batch_isend_irecv(ops)
    BYTES.sent += _nbytes(send)
    return recv, reqs


def wait_all(reqs: list) -> None:
    with in_collective("ring P2P (batch_isend_irecv wait)"):
        for r in reqs:
            r.wait()


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor over `group` (None: the default group), traced as `what`. Bytes:
    a ring all-reduce sends 2 (n-1)/n of the tensor per rank."""
    world = dist.get_world_size(group)
    if world == 1:
        return t
    with in_collective(f"all_reduce({what})"):
        # c10d's own function, not torch.distributed.all_reduce: inside count_all_traffic() (parallel/all_traffic.py)
        # the latter is wrapped to count torch's calls, and this one is counted below
        c10d.all_reduce(t, op=op, group=group)
    BYTES.sent += 2 * (world - 1) * _nbytes(t) // world
    return t


def agree(values: list[int], op: str, what: str, group: dist.ProcessGroup | None = None) -> list[int]:
    """Collective: how the ranks of `group` (None: the default group) agree on small integers (int32: flags and
    counts), elementwise over the ranks: op "max" (any rank's flag, the largest count), "min" (every rank's flag) or
    "sum" (a total count).
    Traced as `what`, so a rank that never arrives is named by the hang watchdog."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    t = torch.tensor(values, dtype=torch.int32, device=device)  # a flag costs 4 bytes
    all_reduce(t, group, what, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
    return t.tolist()


def all_gather_equal(t: torch.Tensor, group: dist.ProcessGroup, what: str) -> list[torch.Tensor]:
    """Every member's tensor of the same shape (gloo's list all_gather needs equal shapes: pad first). Bytes: a ring
    all-gather sends (n-1) copies of the local tensor per rank."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    with in_collective(f"all_gather({what})"):
        dist.all_gather(parts, t.contiguous(), group=group)
    BYTES.sent += (world - 1) * _nbytes(t)
    return parts


def p2p(send: torch.Tensor | None, to: int | None, recv: torch.Tensor | None, frm: int | None, group, what: str):
    """Send `send` to group member `to` and/or receive into `recv` from member `frm`, and wait (either may be None)."""
    ops = []
    if send is not None and to is not None:
        send = send.contiguous()
        ops.append(dist.P2POp(dist.isend, send, dist.get_global_rank(group, to), group))
        BYTES.sent += _nbytes(send)
    if recv is not None and frm is not None:
        ops.append(dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, frm), group))
    if ops:
        with in_collective(f"P2P ({what})"):
            for req in dist.batch_isend_irecv(ops):
                req.wait()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the gradient over the group too (every member's output is the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, what: str) -> torch.Tensor:
        ctx.group, ctx.what = group, what
        return all_reduce(x.contiguous().clone(), group, what)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad.contiguous().clone(), ctx.group, f"{ctx.what} backward"), None, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup, what: str) -> torch.Tensor:
    """Autograd-aware sum over `group` (e.g. statistics of a sharded GroupNorm)."""
    return _AllReduceSum.apply(x, group, what)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group, "tp shared parameter gradient"), None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity forward; the backward sums the gradient over `group` (fairscale's copy_to_model_parallel_region):
    a parameter every tensor-parallel rank uses for its share of the heads."""
    if dist.get_world_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


class _ShiftNext(torch.autograd.Function):
    """Send `send` to the next rank of the group and return what the previous rank sent (shape `recv_shape`;
    0 frames on rank 0). Backward: the received tensor's gradient goes back to the previous rank."""

    @staticmethod
    def forward(ctx, send: torch.Tensor, recv_shape: tuple[int, ...], group: dist.ProcessGroup) -> torch.Tensor:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        ctx.group, ctx.send_shape, ctx.rank, ctx.size = group, send.shape, rank, size
        recv = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
        p2p(send if rank + 1 < size else None, rank + 1, recv if rank > 0 else None, rank - 1, group, "VAE halo")
        return recv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, size = ctx.rank, ctx.size
        g_send = torch.zeros(ctx.send_shape, dtype=grad.dtype, device=grad.device)
        p2p(
            grad if rank > 0 else None,
            rank - 1,
            g_send if rank + 1 < size else None,
            rank + 1,
            ctx.group,
            "VAE halo backward",
        )
        return g_send, None, None


def shift_next(send: torch.Tensor, recv_shape: tuple[int, ...], group: dist.ProcessGroup) -> torch.Tensor:
    """Autograd-aware: send to the next group member, receive from the previous one (empty on member 0)."""
    return _ShiftNext.apply(send, recv_shape, group)
