# The sample judge (bench/judge.py) must be right on clips whose answer is known: every ground-truth clip of the
# synthetic dataset is judged right in every attribute, uniform noise in none, and a written sample file (gif,
# nearest-upscaled as the job writes it) reads back to the same verdict.
import numpy as np
import pytest
import torch

from bench.judge import ground_truth, judge, noise, read_frames, score
from launch.job.media import write_video

pytestmark = pytest.mark.slow  # renders and judges whole clips: not a parity test


def test_ground_truth_clips_are_all_right():
    rows = score(ground_truth(36, seed=3))
    assert all(r["score"] == 1.0 for r in rows), [(r["prompt"], r["verdict"]) for r in rows if r["score"] < 1]


def test_noise_is_all_wrong():
    rows = score(noise([p for p, _ in ground_truth(12)]))
    assert all(r["score"] == 0.0 for r in rows), [(r["prompt"], r["verdict"]) for r in rows if r["score"] > 0]


def test_written_samples_judge_like_their_frames(tmp_path):
    prompt, frames = ground_truth(1, seed=5)[0]
    video = torch.from_numpy(frames).permute(0, 3, 1, 2) * 2 - 1  # (F, 3, H, W) in [-1, 1], as sampling returns
    files = write_video(video, tmp_path / "clip")
    got = judge(read_frames(files[1]))  # the gif
    assert got == judge(frames)
    assert np.all(np.asarray(list(score([(prompt, read_frames(files[1]))])[0]["ok"].values())))
