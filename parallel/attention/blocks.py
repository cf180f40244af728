# The work of local queries against one key/value block, as a list of mask-free kernel calls.
#
# Local rows are [text (L) | frames of the local segments]. A key block is either the text keys or the frames of
# some rank's segments. Frame-causal attention (a query in frame t sees the text and frames <= t; text sees text
# only) needs no mask: a (query segment, key segment) pair is fully visible, invisible (skipped), or — on the
# diagonal — split per query frame f into "frames [b0, f]", which is again fully visible.
#
# Text query rows are always their own kernel calls and their partial results are merged in a fixed order
# (text keys, then blocks by source 0..n-1), so the replicated text outputs are bitwise identical on every rank.
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parallel.attention.kernels import acc_dtype, block_backward, block_bias_grad, block_forward, merge_into
from parallel.sequence import Segment

TEXT_SOURCE = -1  # key of the text-key block in the canonical merge order
NULL_SOURCE = -2  # the learned null key/value block (parallel/attention/bias.py): merged first


@dataclass(frozen=True)
class Item:
    q0: int  # local query rows [q0, q1)
    q1: int
    k0: int  # rows of the key block [k0, k1)
    k1: int
    text: bool  # query rows are text rows


def _coalesce(items: list[Item]) -> list[Item]:
    out: list[Item] = []
    for it in items:
        if out and (out[-1].q0, out[-1].q1, out[-1].text) == (it.q0, it.q1, it.text) and out[-1].k1 == it.k0:
            out[-1] = Item(it.q0, it.q1, out[-1].k0, it.k1, it.text)
        else:
            out.append(it)
    return out


def frame_block_items(
    q_segs: list[Segment], k_segs: list[Segment], text_len: int, tpf: int, causal: bool
) -> list[Item]:
    """Kernel calls of the local queries against a block holding the frames `k_segs` (rows in that order)."""
    L = text_len
    nq = sum(b - a for a, b in q_segs) * tpf
    nk = sum(b - a for a, b in k_segs) * tpf
    if nk == 0:
        return []
    if not causal:
        items = [Item(0, L, 0, nk, True)] if L else []
        return items + ([Item(L, L + nq, 0, nk, False)] if nq else [])
    items: list[Item] = []
    qrow = L
    for a0, a1 in q_segs:
        krow = 0
        for b0, b1 in k_segs:
            if b1 - 1 <= a0:  # every key frame <= every query frame
                items.append(Item(qrow, qrow + (a1 - a0) * tpf, krow, krow + (b1 - b0) * tpf, False))
            elif b0 <= a1 - 1:  # diagonal: query frame f sees key frames [b0, min(f, b1 - 1)]
                for f in range(max(a0, b0), a1):
                    r = qrow + (f - a0) * tpf
                    items.append(Item(r, r + tpf, krow, krow + (min(f, b1 - 1) + 1 - b0) * tpf, False))
            krow += (b1 - b0) * tpf
        qrow += (a1 - a0) * tpf
    return _coalesce(sorted(items, key=lambda it: (it.q0, it.k0)))


def text_block_items(text_len: int, num_frame_rows: int) -> list[Item]:
    """Every query (text or frame, causal or not) sees all text keys."""
    if text_len == 0:
        return []
    items = [Item(0, text_len, 0, text_len, True)]
    if num_frame_rows:
        items.append(Item(text_len, text_len + num_frame_rows, 0, text_len, False))
    return items


def null_block_items(num_null: int, text_len: int, num_frame_rows: int) -> list[Item]:
    """Every query sees the null keys."""
    if num_null == 0:
        return []
    items = [Item(0, text_len, 0, num_null, True)] if text_len else []
    return items + ([Item(text_len, text_len + num_frame_rows, 0, num_null, False)] if num_frame_rows else [])


def split_rows(items: list[Item], rows: int) -> list[Item]:
    """The same work with at most `rows` query rows per kernel call (0: unchanged). Rows are independent, so the
    split is exact; it bounds what one call materialises with a bias: the (B, H, rows, Sk) bias and, for the bias
    gradient, the probabilities of those rows."""
    if rows <= 0:
        return items
    return [Item(a, min(a + rows, it.q1), it.k0, it.k1, it.text) for it in items for a in range(it.q0, it.q1, rows)]


def _max_rows(bias) -> int:
    return 0 if bias is None else getattr(bias, "max_rows", 0)


def _rows(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x[:, :, a:b]  # (B, H, b-a, D) view of (B, H, S, D)


@dataclass
class ForwardState:
    """Running (out, LSE) of all local rows in `acc_dtype`. Frame rows are merged as blocks arrive; text-row
    partials are kept per source and merged in source order at the end (bitwise-identical text on every rank)."""

    out: torch.Tensor  # (B, H, L + N, D)
    lse: torch.Tensor  # (B, H, L + N)
    text_parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, Item]]] = field(default_factory=dict)

    @classmethod
    def empty(cls, q: torch.Tensor) -> ForwardState:
        acc = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        return cls(out, lse)

    def run(self, q, k, v, items: list[Item], source: int, scale: float, bias=None) -> None:
        """`bias`: a parallel.attention.bias.BlockBias (or None): the additive bias of each item."""
        for it in split_rows(items, _max_rows(bias)):
            b = bias(it, source) if bias is not None else None
            b = None if b is None else b.to(q.dtype)
            out, lse = block_forward(_rows(q, it.q0, it.q1), _rows(k, it.k0, it.k1), _rows(v, it.k0, it.k1), scale, b)
            if it.text:
                self.text_parts.setdefault(source, []).append((out, lse, it))
            else:
                merge_into(_rows(self.out, it.q0, it.q1), self.lse[:, :, it.q0 : it.q1], out, lse)

    def finalize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """out (B, H, L + N, D) in `dtype` (no copy when it is the accumulation dtype), LSE (B, H, L + N)."""
        for source in sorted(self.text_parts):
            for out, lse, it in self.text_parts[source]:
                merge_into(_rows(self.out, it.q0, it.q1), self.lse[:, :, it.q0 : it.q1], out, lse)
        self.text_parts.clear()
        return self.out.to(dtype), self.lse


def backward_items(
    dout,
    q,
    k,
    v,
    out,
    lse,
    items: list[Item],
    scale: float,
    *,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    source: int = 0,
    bias=None,
    dtable: torch.Tensor | None = None,
) -> None:
    """Accumulate (fp32, in place) the gradients of `items`: dq over the local rows, dk/dv over the block rows,
    and — with a BlockBias whose table is learned — the table's gradient into `dtable`."""
    for it in split_rows(items, _max_rows(bias)):
        b = bias(it, source) if bias is not None else None
        b = None if b is None else b.to(q.dtype)
        args = (
            _rows(dout, it.q0, it.q1),
            _rows(q, it.q0, it.q1),
            _rows(k, it.k0, it.k1),
            _rows(v, it.k0, it.k1),
            _rows(out, it.q0, it.q1),
            lse[:, :, it.q0 : it.q1],
            scale,
        )
        gq, gk, gv = block_backward(*args, b)
        if dtable is not None and b is not None and bias.learns(it, source):
            bias.add_table_grad(it, source, block_bias_grad(*args, b), dtable)
        _rows(dq, it.q0, it.q1).add_(gq)
        _rows(dk, it.k0, it.k1).add_(gk)
        _rows(dv, it.k0, it.k1).add_(gv)
