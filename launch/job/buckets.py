# Buckets of clip shapes (issue #26, first part): which bucket a clip goes to, how many clips of a bucket make a
# micro-batch under a token budget, and the order of an epoch's bucketed micro-batches. The order is a function of
# the seed and the epoch only, and a step of dp data-parallel groups takes the next dp micro-batches of it, so the
# position in an epoch is one count whatever the layout: a run resumed under another dp continues with the next
# micro-batch, and no clip of the epoch is seen twice or skipped (the clips of a bucket that do not fill its last
# micro-batch wait for the next epoch, which draws another remainder).
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cpdit.seeding import generator
from launch.job.data import DataPosition, MicroBatch, stack_clips


@dataclass(frozen=True)
class Bucket:
    """A clip shape in pixels."""

    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(spec) -> list[Bucket]:
    """`data.buckets`: a list of [frames, height, width]; each a positive integer, no bucket twice."""
    out = []
    for item in spec:
        values = list(item)
        if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"data.buckets: {values!r} is not [frames, height, width] of positive integers")
        out.append(Bucket(*values))
    if len(set(out)) != len(out):
        raise ValueError(f"data.buckets lists a bucket twice: {[b.name for b in out]}")
    return out


def assign(frames: int, height: int, width: int, buckets: list[Bucket]) -> int | None:
    """The bucket a clip of `frames` frames of `height` x `width` goes to: of the buckets it covers (at most its
    frames), the nearest in aspect ratio (on a log scale: 2:1 is as far from 1:1 as 1:2), then the longest; None when
    it is shorter than every bucket (skipped and counted by the dataset)."""
    covered = [i for i, b in enumerate(buckets) if b.frames <= frames]
    if not covered:
        return None
    ratio = math.log(width / height)
    return min(covered, key=lambda i: (round(abs(ratio - math.log(buckets[i].aspect)), 9), -buckets[i].frames, i))


def micro_batch(tokens_per_clip: int, budget: int) -> int:
    """Clips of a bucket per micro-batch under a budget of `budget` tokens per cp group: as many as fit, at least
    one (a clip above the budget runs alone; the planner says whether it fits in memory)."""
    return max(1, budget // tokens_per_clip)


def epoch_batches(bucket_of: list[int | None], sizes: dict[int, int], seed: int, epoch: int) -> list[tuple[int, list]]:
    """Epoch `epoch`'s micro-batches, in order: (bucket, clip indices). Each bucket's clips in a permutation drawn
    from (seed, epoch), cut into micro-batches of its size; then every micro-batch of every bucket in one shuffled
    order, so buckets come in proportion to their clips. `bucket_of[i]`: clip i's bucket (None: skipped)."""
    g = generator(seed, "bucket order", epoch)
    batches = []
    for b in sorted({x for x in bucket_of if x is not None}):
        clips = [i for i, x in enumerate(bucket_of) if x == b]
        perm = torch.randperm(len(clips), generator=g).tolist()
        size = sizes[b]
        batches += [(b, [clips[j] for j in perm[k : k + size]]) for k in range(0, len(clips) - size + 1, size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class BucketedOrder:
    """The micro-batches a data-parallel rank takes: a step of k micro-steps takes the next k x dp micro-batches of
    the epoch's order, micro-step m of dp rank d the (m x dp + d)-th. `position`: (epoch, micro-batches of the epoch
    taken by all ranks together). A step never spans two epochs: the few left that do not fill one wait."""

    def __init__(
        self, bucket_of, sizes, seed: int, dp_rank: int, dp: int, position: tuple[int, int] = (0, 0), accum: int = 1
    ):
        self.bucket_of, self.sizes, self.seed, self.dp_rank, self.dp = bucket_of, sizes, seed, dp_rank, dp
        self.accum = accum
        self.epoch, self.taken = position
        self._order = epoch_batches(bucket_of, sizes, seed, self.epoch)
        if len(self._order) < dp * accum:
            raise ValueError(
                f"an epoch has {len(self._order)} bucketed micro-batches, fewer than the {dp} data-parallel ranks x "
                f"{accum} micro-steps (train.grad_accum) of one step; add clips or lower data.token_budget"
            )

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.taken

    def step(self) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]]]:
        """(this rank's micro-batches of the next step, in order; every rank's), each (bucket, clip indices)."""
        n = self.dp * self.accum
        if self.taken + n > len(self._order):
            self.epoch, self.taken = self.epoch + 1, 0
            self._order = epoch_batches(self.bucket_of, self.sizes, self.seed, self.epoch)
        every = self._order[self.taken : self.taken + n]
        self.taken += n
        return every[self.dp_rank :: self.dp], every


class BucketedBatches:
    """The job's data stream with data.buckets: each micro-step a micro-batch of one bucket (launch/bucket_plan.py
    sets its size and cp degree), with the step's sample and token counts every rank knows from the order."""

    def __init__(self, dataset, plans, seed: int, dp_rank: int, dp: int, grad_accum: int, position: DataPosition):
        self.ds, self.plans = dataset, plans
        sizes = {i: p.micro for i, p in enumerate(plans)}
        self.order = BucketedOrder(
            dataset.bucket_of, sizes, seed, dp_rank, dp, (position.epoch, position.batches), grad_accum
        )
        self._queue: list = []

    @property
    def pos(self) -> DataPosition:
        epoch, taken = self.order.position
        return DataPosition(epoch, 0, taken)

    def next(self) -> MicroBatch:
        if not self._queue:
            mine, every = self.order.step()
            samples = sum(len(ids) for _, ids in every)
            tokens = sum(len(ids) * self.plans[b].tokens for b, ids in every)
            first = 0
            for b, ids in mine:
                self._queue.append((b, ids, first, samples, tokens))
                first += len(ids)
        b, ids, first, samples, tokens = self._queue.pop(0)
        plan = self.plans[b]
        video, captions = stack_clips([self.ds[i] for i in ids])
        return MicroBatch(video, captions, ids, first, samples, tokens, plan.cp, plan.bucket.name)
