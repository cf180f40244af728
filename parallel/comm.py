# Point-to-point and all-to-all helpers over explicit groups, with a byte counter for the benchmarks.
# gloo needs contiguous tensors for P2P and all_to_all_single; every helper here makes them so.
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

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
