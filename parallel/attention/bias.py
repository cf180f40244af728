# Additive biases of one rank's kernel calls, from global positions (cpdit/attn_bias.py holds the rules).
#
# Ring, all-gather and Ulysses all see the sequence as [text | frames of member 0 | member 1 | ...]; a kernel call
# (an `Item` of parallel/attention/blocks.py) pairs local query rows with rows of one key block: the null keys,
# the text keys, or the frames of some member. `BlockBias` maps the item's rows to global (t, y, x) positions and
# builds its bias (relative-position table lookup, text padding, frame padding), so every block gets the offsets of
# where its frames really are — zigzag and uneven layouts included — and no bias ever travels.
#
# Gradients: the table's gradient of an item is dS = P * (dP - delta) gathered back onto the table by index
# (`add_table_grad`); null key/value gradients are accumulated like any key block. Both are the rank's *partial*
# gradients (its own queries only); the sum over cp ranks — done by the parameter-gradient reduction, as for the
# replicated text — is the true gradient.
from __future__ import annotations

from dataclasses import replace

import torch

from cpdit.attn_bias import AttentionBias, null_bias, pair_bias, relative_index, video_positions
from parallel.attention.blocks import NULL_SOURCE, TEXT_SOURCE
from parallel.sequence import Segment


class BlockBias:
    """Bias of the items of one rank. `blocks[j]`: frame segments of member j in row order; local rows are
    [text (text_len) | blocks[rank]]."""

    def __init__(
        self,
        bias: AttentionBias,
        blocks: tuple[tuple[Segment, ...], ...],
        rank: int,
        text_len: int,
        num_null: int = 0,
        max_rows: int = 0,
    ):
        self.bias, self.text_len, self.num_null = bias, text_len, num_null
        self.max_rows = max_rows  # query rows per kernel call (0: a whole item): bounds the bias working set
        _, h, w = bias.grid
        self.pos = [
            video_positions(torch.tensor([f for a, b in segs for f in range(a, b)], dtype=torch.long), h, w)
            for segs in blocks
        ]  # (rows of member j, 3)
        self.local = self.pos[rank]

    def with_tensors(self, table: torch.Tensor | None, null_kv: torch.Tensor | None, hs: slice) -> BlockBias:
        """The same positions with the tensors of one ring pass: its table and null keys/values, and the
        null-key slopes of its heads `hs`."""
        out = object.__new__(BlockBias)
        out.__dict__.update(self.__dict__)
        slopes = self.bias.null_slopes
        out.bias = replace(self.bias, table=table, null_kv=null_kv, null_slopes=None if slopes is None else slopes[hs])
        return out

    @property
    def table(self) -> torch.Tensor | None:
        return self.bias.table

    def _q_pos(self, it) -> torch.Tensor | None:
        L = self.text_len
        return None if it.text else self.local[it.q0 - L : it.q1 - L].to(self._device())

    def _device(self) -> torch.device:
        b = self.bias
        for t in (b.table, b.text_mask, b.frame_lengths, b.null_kv, b.null_slopes):
            if t is not None:
                return t.device
        return torch.device("cpu")

    def __call__(self, it, source: int) -> torch.Tensor | None:
        """(B | 1, H | 1, Sq, Sk) float32 bias of an item against the key block `source`, or None."""
        if source == NULL_SOURCE:
            return null_bias(self.bias.null_slopes, self._q_pos(it), self.num_null, it.k0, it.k1)
        if source == TEXT_SOURCE:
            return pair_bias(self.bias, self._q_pos(it), None, (it.k0, it.k1))
        return pair_bias(self.bias, self._q_pos(it), self.pos[source][it.k0 : it.k1].to(self._device()), None)

    def learns(self, it, source: int) -> bool:
        """Whether the item's bias depends on the table (video queries x video keys)."""
        return self.table is not None and source >= 0 and not it.text

    def add_table_grad(self, it, source: int, dbias: torch.Tensor, dtable: torch.Tensor) -> None:
        """dbias (B, H, Sq, Sk) of the item -> accumulate into dtable (H, *table offsets) in place."""
        k_pos = self.pos[source][it.k0 : it.k1].to(dbias.device)
        idx = relative_index(self._q_pos(it), k_pos, tuple(dtable.shape[1:]))
        dtable.view(dtable.shape[0], -1).index_add_(1, idx.flatten(), dbias.sum(0).flatten(1).to(dtable.dtype))
