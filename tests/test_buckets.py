# Buckets of clip shapes (launch/job/buckets.py): where a clip goes, micro-batches under a token budget, and an
# epoch's order that a run resumed under another data-parallel size continues without a clip twice or skipped.
import pytest

from launch.job.buckets import Bucket, BucketedOrder, assign, epoch_batches, micro_batch, parse_buckets

BUCKETS = parse_buckets([[9, 16, 24], [17, 16, 24], [33, 16, 24], [17, 24, 16], [49, 16, 16]])


def test_a_clip_goes_to_the_nearest_aspect_then_the_longest_bucket_it_covers():
    assert assign(40, 480, 720, BUCKETS) == 2  # landscape 3:2, 40 frames: 33 is the longest it covers
    assert assign(20, 480, 720, BUCKETS) == 1
    assert assign(20, 720, 480, BUCKETS) == 3  # portrait: the 2:3 bucket
    assert assign(60, 500, 500, BUCKETS) == 4  # square
    assert assign(12, 720, 480, BUCKETS) == 0  # no portrait bucket it covers: the nearest aspect it does cover
    assert assign(8, 480, 720, BUCKETS) is None  # shorter than every bucket: skipped
    # on a log scale 2:1 and 1:2 are equally far from 1:1: the tie goes to the longer, then the first listed
    assert assign(20, 10, 10, parse_buckets([[9, 10, 20], [17, 20, 10]])) == 1


def test_bad_bucket_lists_are_refused():
    with pytest.raises(ValueError, match="is not \\[frames, height, width\\] of positive integers"):
        parse_buckets([[9, 16]])
    with pytest.raises(ValueError, match="positive integers"):
        parse_buckets([[9, 0, 16]])
    with pytest.raises(ValueError, match="lists a bucket twice"):
        parse_buckets([[9, 16, 16], [9, 16, 16]])
    assert Bucket(17, 16, 24).name == "17x16x24"


def test_micro_batch_fills_the_token_budget():
    assert micro_batch(1000, 4096) == 4 and micro_batch(5000, 4096) == 1 and micro_batch(100, 4096) == 40


def _mix(n=60):
    """60 clips over 3 buckets (30, 20, 9) and one skipped."""
    return [0] * 30 + [1] * 20 + [2] * 9 + [None]


def test_an_epoch_takes_each_clip_at_most_once_in_proportion():
    sizes = {0: 4, 1: 2, 2: 3}
    order = epoch_batches(_mix(), sizes, seed=0, epoch=0)
    clips = [c for _, batch in order for c in batch]
    assert len(clips) == len(set(clips)) and 59 not in clips  # the skipped clip never comes
    assert (
        sum(b == 0 for b, _ in order) == 7
        and sum(b == 1 for b, _ in order) == 10
        and sum(b == 2 for b, _ in order) == 3
    )
    assert all(len(batch) == sizes[b] for b, batch in order)
    assert all(all(_mix()[c] == b for c in batch) for b, batch in order)  # a micro-batch holds one bucket
    assert order == epoch_batches(_mix(), sizes, seed=0, epoch=0)  # a function of seed and epoch
    assert order != epoch_batches(_mix(), sizes, seed=0, epoch=1) != epoch_batches(_mix(), sizes, seed=1, epoch=0)


def _steps(order_of, steps):
    """What the ranks of a layout take over `steps` steps: [(bucket, clips)] in rank order per step."""
    return [[o.step()[0][0] for o in order_of] for _ in range(steps)]


def test_a_run_resumed_under_another_dp_continues_with_the_next_micro_batch():
    """dp=2 for 3 steps, then dp=4 from its position: together they take what one uninterrupted order holds, in
    the same sequence, with no clip twice; at the epoch's end the few left over are skipped and the next epoch
    starts, the same way under every dp."""
    sizes = {0: 4, 1: 2, 2: 3}
    whole = epoch_batches(_mix(), sizes, 0, 0)
    two = [BucketedOrder(_mix(), sizes, 0, r, 2) for r in range(2)]
    first = [b for step in _steps(two, 3) for b in step]
    four = [BucketedOrder(_mix(), sizes, 0, r, 4, position=two[0].position) for r in range(4)]
    second = [b for step in _steps(four, 3) for b in step]
    assert two[0].position == (0, 6) and first + second == whole[:18]
    clips = [c for _, batch in first + second for c in batch]
    assert len(clips) == len(set(clips))
    nxt = [o.step()[0][0] for o in four]  # 18 taken of 20: 2 left, fewer than dp=4 -> epoch 1
    assert four[0].position == (1, 4) and nxt == epoch_batches(_mix(), sizes, 0, 1)[:4]
    with pytest.raises(ValueError, match="fewer than the 64 data-parallel ranks"):
        BucketedOrder(_mix(), sizes, 0, 0, 64)


def test_a_step_of_micro_steps_takes_dp_x_accum_micro_batches_in_rank_order():
    """grad_accum=2 on dp=2: micro-step m of rank d takes micro-batch m x dp + d of the step's four, and every rank
    sees all four (the step's sample count); a step never spans an epoch's end."""
    sizes = {0: 4, 1: 2, 2: 3}
    whole = epoch_batches(_mix(), sizes, 0, 0)
    ranks = [BucketedOrder(_mix(), sizes, 0, r, 2, accum=2) for r in range(2)]
    (mine0, every0), (mine1, every1) = (o.step() for o in ranks)
    assert every0 == every1 == whole[:4] and mine0 == [whole[0], whole[2]] and mine1 == [whole[1], whole[3]]
    for _ in range(4):  # 20 micro-batches: steps 2..5 take 4..19 ...
        ranks[0].step()
    assert ranks[0].position == (0, 20)
    assert ranks[0].step()[1] == epoch_batches(_mix(), sizes, 0, 1)[:4]  # ... and the next starts epoch 1
