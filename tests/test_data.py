# Datasets: the synthetic default, the CogVideoX folder layout decoded from real mp4 files, corrupt files skipped.
import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from cpdit.seeding import generator
from launch.job.data import MOTIONS, DistributedBatches, SyntheticShapes, SyntheticShapesI2V, VideoFolder


def test_synthetic_is_deterministic_and_captioned():
    ds = SyntheticShapes(8, num_frames=6, height=16, width=20, seed=3)
    v, cap = ds[5]
    v2, cap2 = SyntheticShapes(8, 6, 16, 20, seed=3)[5]
    assert v.shape == (6, 3, 16, 20) and torch.equal(v, v2) and cap == cap2
    assert v.min() >= -1 and v.max() <= 1
    assert cap.startswith("a ") and " moving " in cap
    assert not torch.equal(v[0], v[-1])  # the shape moves


def test_synthetic_i2v_captions_only_the_motion_and_the_first_frame_shows_the_rest():
    """data.dataset=synthetic_i2v: "a shape moving <direction>"; the whole shape stays in the frame every frame
    (start drawn among those that keep it inside); colour, shape and start vary; the default set is unchanged."""
    ds = SyntheticShapesI2V(64, num_frames=8, height=16, width=16, seed=2)
    starts, looks = set(), set()
    for i in range(len(ds)):
        video, caption = ds[i]
        color, shape, motion, rng = ds.describe(i)
        assert caption == f"a shape moving {motion}" and motion in MOTIONS
        (cy, cx), r, (dx, dy) = ds.start(motion, rng), ds.radius(), MOTIONS[motion]
        for t in range(8):  # the shape's centre keeps a radius from every border all the way
            y, x = cy + dy * 16 * ds.TRAVEL * t / 7, cx + dx * 16 * ds.TRAVEL * t / 7
            assert r - 1e-9 <= y <= 16 - r + 1e-9 and r - 1e-9 <= x <= 16 - r + 1e-9, (i, t, y, x)
        assert (video[0] > -1).any()
        starts.add(tuple(torch.nonzero(video[0, 0] > -1).float().mean(0).round().tolist()))
        looks.add((color, shape))
        assert torch.equal(video, SyntheticShapesI2V(64, 8, 16, 16, seed=2)[i][0])
    assert len(starts) > 20 and len(looks) >= 16  # of 18 (colour, shape) pairs
    # the text-to-video set draws the same (colour, shape, motion) and renders as before: start fixed by caption
    t2v = SyntheticShapes(64, 8, 16, 16, seed=2)
    assert [t2v.describe(i)[:3] for i in range(8)] == [ds.describe(i)[:3] for i in range(8)]
    assert t2v[0][1] == "a {} {} moving {}".format(*t2v.describe(0)[:3])


def _write_mp4(path, frames, fps=16):
    imageio.mimwrite(str(path), list(frames), fps=fps, codec="libx264", macro_block_size=16)


def test_video_folder_decodes_and_skips_corrupt(tmp_path, caplog):
    (tmp_path / "videos").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        _write_mp4(tmp_path / "videos" / f"clip{i}.mp4", rng.integers(0, 255, (20, 48, 64, 3), dtype=np.uint8))
        (tmp_path / "labels" / f"clip{i}.txt").write_text(f"caption {i}\n")
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 100)
    (tmp_path / "labels" / "broken.txt").write_text("never seen")
    _write_mp4(tmp_path / "videos" / "short.mp4", rng.integers(0, 255, (2, 48, 64, 3), dtype=np.uint8))
    (tmp_path / "labels" / "short.txt").write_text("too short")
    _write_mp4(tmp_path / "videos" / "nolabel.mp4", rng.integers(0, 255, (20, 48, 64, 3), dtype=np.uint8))
    ds = VideoFolder(tmp_path, num_frames=5, height=32, width=32, fps=8)
    assert len(ds) == 5  # nolabel.mp4 has no caption: not listed
    seen = {}
    for i in range(len(ds)):
        video, cap = ds[i]
        assert video.shape == (5, 3, 32, 32) and -1 <= video.min() and video.max() <= 1
        seen[cap] = video
    assert set(seen) == {"caption 0", "caption 1", "caption 2"}
    assert ds.skipped == 2 and "skipping unreadable video" in caplog.text
    batches = DistributedBatches(ds, batch_size=2, dp_rank=1, dp_size=2, seed=0)
    batch = batches.next()
    assert batch.video.shape == (2, 5, 3, 32, 32) and len(batch.captions) == 2


def test_bad_dataset_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no videos/ directory"):
        VideoFolder(tmp_path, 5, 32, 32, 8)
    (tmp_path / "videos").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos/\\*.mp4 with a labels"):
        VideoFolder(tmp_path, 5, 32, 32, 8)
    with pytest.raises(ValueError, match="needs at least that many"):
        DistributedBatches(SyntheticShapes(3, 2, 8, 8), batch_size=2, dp_rank=0, dp_size=2)


def test_batches_resume_exactly():
    ds = SyntheticShapes(12, 2, 8, 8)
    a = DistributedBatches(ds, 2, 0, 2, seed=1)
    seq = [a.next().captions for _ in range(7)]  # crosses an epoch (3 batches per epoch per rank)
    b = DistributedBatches(ds, 2, 0, 2, seed=1)
    for _ in range(4):
        b.next()
    c = DistributedBatches(ds, 2, 0, 2, seed=1, position=b.pos)
    assert [c.next().captions for _ in range(3)] == seq[4:]


def test_synthetic_clip_is_determined_by_its_caption():
    """The default dataset maps each of its 72 captions to one clip (what the caption names is all that varies)."""
    ds = SyntheticShapes(160, num_frames=8, height=16, width=16, seed=0)
    seen: dict[str, torch.Tensor] = {}
    for i in range(len(ds)):
        video, caption = ds[i]
        if caption in seen:
            assert torch.equal(video, seen[caption]), caption
        seen[caption] = video
    assert len(seen) > 50


class _Ids:
    """A dataset whose clips are their indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([i]), f"clip {i}"


def _take(n_steps: int, dp: int, bs: int, position, n: int = 40):
    """n_steps steps of every data-parallel rank from `position`: (clip ids in order of the permutation, position)."""
    ranks = [DistributedBatches(_Ids(n), bs, r, dp, seed=5, position=position) for r in range(dp)]
    ids = []
    for _ in range(n_steps):
        for b in ranks:
            ids += b.next().video.flatten().tolist()
    assert len({b.pos.clips for b in ranks}) == 1
    return ids, ranks[0].pos


@pytest.mark.parametrize("before, after", [((2, 2), (4, 1)), ((2, 2), (1, 4)), ((1, 3), (2, 3)), ((4, 1), (1, 2))])
def test_a_resume_under_another_dp_size_sees_every_clip_once(before, after):
    """The data position counts clips, not per-rank batches: changing dp (or the batch size) at a checkpoint
    continues with the next clip of the epoch's permutation; nothing is seen twice or skipped within the epoch."""
    from launch.job.data import DataPosition

    first, pos = _take(3, *before, DataPosition())
    steps_left = (40 - pos.clips) // (after[0] * after[1])
    rest, end = _take(steps_left, *after, DataPosition(**vars(pos)))
    seen = first + rest
    assert len(seen) == len(set(seen)) and end.epoch == 0
    assert len(seen) > 40 - after[0] * after[1]  # at most the leftover of the epoch is skipped
    perm = torch.randperm(40, generator=generator(5, "data order", 0)).tolist()
    assert sorted(seen, key=perm.index) == perm[: len(seen)]  # the epoch's permutation, in order, without holes
    nxt, _ = _take(1, *after, end)
    assert _take(1, *after, DataPosition(1, 0))[0] == nxt  # then the next epoch starts from its beginning


def test_old_checkpoints_data_position_is_converted():
    """Checkpoints before the clip count stored batches per dp rank: converted with their dp and batch size."""
    from launch.job.data import DataPosition

    meta = {
        "data": {"epoch": 2, "index": 3},
        "layout": "world=4 dp_replicate=1 dp_shard=2 cp=2 (ring=2 x ulysses=1) tp=1",
        "config": "data:\n  batch_size: 4\n",
    }
    assert DataPosition.from_meta(meta) == DataPosition(2, 24)
    assert DataPosition.from_meta({"data": {"epoch": 1, "clips": 8}}) == DataPosition(1, 8)


def test_synthetic_buckets_draw_their_shares_and_keep_each_clips_caption():
    """data.buckets on the synthetic set: clip i's bucket is drawn from (seed, i) with data.bucket_weights, and it is
    clip i (same caption, same motion) rendered at that bucket's shape."""
    from launch.job.bucketed import SyntheticBuckets
    from launch.job.buckets import Bucket

    buckets = [Bucket(9, 16, 24), Bucket(17, 16, 16), Bucket(33, 24, 16)]
    ds = SyntheticBuckets("synthetic", 400, buckets, [6, 3, 1], seed=4)
    counts = [ds.bucket_of.count(b) for b in range(3)]
    assert sum(counts) == 400 and counts[0] > counts[1] > counts[2] > 0
    assert abs(counts[0] / 400 - 0.6) < 0.08 and abs(counts[2] / 400 - 0.1) < 0.05
    assert ds.bucket_of == SyntheticBuckets("synthetic", 400, buckets, [6, 3, 1], seed=4).bucket_of
    for i in range(6):
        b = buckets[ds.bucket_of[i]]
        video, caption = ds[i]
        assert video.shape == (b.frames, 3, b.height, b.width)
        assert caption == SyntheticShapes(400, 8, 16, 16, seed=4)[i][1]


def test_a_bucketed_folder_assigns_each_video_to_the_bucket_it_fits(tmp_path, caplog):
    """Nearest aspect ratio first, then the longest bucket the video covers (frames at data.fps); a video shorter
    than every bucket is skipped and counted; an unreadable one is replaced by another of its bucket."""
    from launch.job.bucketed import BucketedFolder
    from launch.job.buckets import Bucket

    (tmp_path / "videos").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(1)
    clips = {  # name: (frames at 16 fps, height, width) -> frames at 8 fps are half
        "a_landscape_long": (40, 32, 48),  # 20 frames at 8 fps, 3:2 -> 17x16x24
        "b_landscape_short": (12, 32, 48),  # 6 -> 5x16x24
        "c_square": (40, 32, 32),  # 20 -> 17x16x16 (9x16x16 also covered: the longer wins)
        "d_portrait": (40, 48, 32),  # 2:3 -> nearer 1:1 than 3:2 on a log scale: 17x16x16
        "e_too_short": (6, 32, 32),  # 3 frames: fits no bucket
        "f_square_broken": (40, 32, 32),
    }
    for name, (f, h, w) in clips.items():
        _write_mp4(tmp_path / "videos" / f"{name}.mp4", rng.integers(0, 255, (f, h, w, 3), dtype=np.uint8))
        (tmp_path / "labels" / f"{name}.txt").write_text(name)
    buckets = [Bucket(17, 16, 24), Bucket(5, 16, 24), Bucket(9, 16, 16), Bucket(17, 16, 16)]
    ds = BucketedFolder(tmp_path, buckets, fps=8)
    assert ds.bucket_of == [0, 1, 3, 3, None, 3]
    assert ds.skipped == 1 and ds.counts() == [1, 1, 0, 3] and "fit no bucket" in caplog.text
    for i in (0, 1, 2, 3):
        video, caption = ds[i]
        b = buckets[ds.bucket_of[i]]
        assert video.shape == (b.frames, 3, b.height, b.width) and caption == list(clips)[i]
    (tmp_path / "videos" / "f_square_broken.mp4").write_bytes(b"\x00 truncated")  # broken after the scan
    video, caption = ds[5]
    assert caption == "c_square" and video.shape == (17, 3, 16, 16) and ds.skipped == 2


def test_bucketed_batches_give_each_micro_batch_its_plan_and_the_steps_counts():
    """The job's stream with data.buckets: each micro-batch one bucket at its plan's cp degree; every rank knows the
    step's clips and tokens (all dp groups); the position counts micro-batches and resumes under another dp."""
    from launch.bucket_plan import BucketPlan
    from launch.job.bucketed import SyntheticBuckets
    from launch.job.buckets import Bucket, BucketedBatches
    from launch.job.data import DataPosition

    buckets = [Bucket(9, 8, 12), Bucket(5, 8, 8)]
    plans = [BucketPlan(buckets[0], 100, 9, 2, 2, 1), BucketPlan(buckets[1], 40, 5, 4, 1, 2)]
    ds = SyntheticBuckets("synthetic", 40, buckets, None, seed=0)
    ranks = [BucketedBatches(ds, plans, 0, r, 2, 2, DataPosition()) for r in range(2)]
    steps = [[[b.next() for _ in range(2)] for b in ranks] for _ in range(2)]  # 2 steps x 2 ranks x 2 micro-steps
    for step in steps:
        every = [m for rank in step for m in rank]
        assert {m.step_samples for m in every} == {sum(len(m.ids) for m in every)}
        assert {m.step_tokens for m in every} == {sum(len(m.ids) * (100 if m.cp == 2 else 40) for m in every)}
        for rank in step:
            assert [m.first for m in rank] == [0, len(rank[0].ids)]
        for m in every:
            b = plans[[p.bucket.name for p in plans].index(m.bucket)]
            assert m.cp == b.cp and len(m.ids) == b.micro and m.video.shape[1:3] == (b.bucket.frames, 3)
    assert ranks[0].pos == DataPosition(0, 0, 8)
    resumed = BucketedBatches(ds, plans, 0, 0, 4, 1, ranks[0].pos)  # dp 4: the next micro-batch of the order
    whole = BucketedBatches(ds, plans, 0, 0, 1, 1, DataPosition())
    order = [whole.next().ids for _ in range(9)]
    assert resumed.next().ids == order[8]
