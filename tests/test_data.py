# Datasets: the synthetic default, the CogVideoX folder layout decoded from real mp4 files, corrupt files skipped.
import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from launch.data import DistributedBatches, SyntheticShapes, VideoFolder


def test_synthetic_is_deterministic_and_captioned():
    ds = SyntheticShapes(8, num_frames=6, height=16, width=20, seed=3)
    v, cap = ds[5]
    v2, cap2 = SyntheticShapes(8, 6, 16, 20, seed=3)[5]
    assert v.shape == (6, 3, 16, 20) and torch.equal(v, v2) and cap == cap2
    assert v.min() >= -1 and v.max() <= 1
    assert cap.startswith("a ") and " moving " in cap
    assert not torch.equal(v[0], v[-1])  # the shape moves


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
    video, caps = batches.next()
    assert video.shape == (2, 5, 3, 32, 32) and len(caps) == 2


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
    seq = [a.next()[1] for _ in range(7)]  # crosses an epoch (3 batches per epoch per rank)
    b = DistributedBatches(ds, 2, 0, 2, seed=1)
    for _ in range(4):
        b.next()
    c = DistributedBatches(ds, 2, 0, 2, seed=1, position=b.pos)
    assert [c.next()[1] for _ in range(3)] == seq[4:]


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
