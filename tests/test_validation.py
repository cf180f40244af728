# Validation while training (sample.every, launch/job/validation.py) on real 4-rank jobs (cp=2 x tp=2): the samples of
# every N-th step land in samples/step_N/ and reach wandb at their step, the judge's score of each (synthetic data) is
# a "validation" row of metrics.jsonl, the final samples are judged too, validating changes nothing of the training,
# and a sampling failure during training is reported while training goes on.
import math

import pytest
from job_helpers import launch, losses

pytestmark = pytest.mark.slow  # real cpdit-launch jobs

COMMON = ["data.num_samples=8", "train.steps=4", "optim.lr=3e-3", "sample.num_steps=2", "train.export=false"]
PROMPTS = "sample.prompts=[a red circle moving left,a blue square moving up]"


def _validation_rows(rows):
    return {r["step"]: r for r in rows if r.get("event") == "validation"}


def test_samples_every_n_steps_are_written_logged_and_judged(tmp_path):
    launch(tmp_path, "plain", *COMMON, "sample.at_end=false", "logging.wandb=false")
    launch(tmp_path, "val", *COMMON, PROMPTS, "sample.every=2")
    run = tmp_path / "val"
    for step_dir in ("step_00000002",):  # step 4 is the last: sample.at_end's samples/
        for ext in ("mp4", "gif", "png"):
            assert len(list((run / "samples" / step_dir).glob(f"*.{ext}"))) == 2, (step_dir, ext)
    assert len(list((run / "samples").glob("*.mp4"))) == 2
    plain, _ = losses(tmp_path / "plain")
    got, rows = losses(run)
    assert got == plain  # sampling in between changes no draw and no weight of the training
    val = _validation_rows(rows)
    assert sorted(val) == [2, 4]
    for r in val.values():
        assert r["judged"] == 2 and 0.0 <= r["judge_score"] <= 1.0 and r["judge_all_right"] in (0, 1, 2)
        assert math.isfinite(r["judge_score"])
    media = list((run / "wandb").glob("offline-run-*/files/media/videos/samples_*.mp4"))
    assert len(media) == 4  # two prompts at step 2 and two at the end


def test_a_failing_validation_is_reported_and_training_goes_on(tmp_path):
    """Rank 1 fails preparing its first validation prompt: every rank stops that sampling together, says so, and
    trains on to the end (exit 0)."""
    r = launch(
        tmp_path,
        "vf",
        *COMMON,
        "sample.every=2",
        "sample.at_end=false",
        "debug.fail_sample=prompt",
        "debug.fail_rank=1",
    )
    failed = "validation at step 2 failed: SamplingFailed: preparing prompt 0 of the replica on rank"
    assert f"{failed} 1: RuntimeError: injected" in r.stderr and f"{failed} 0: another rank failed" in r.stderr
    got, rows = losses(tmp_path / "vf")
    assert sorted(got) == [1, 2, 3, 4] and not _validation_rows(rows)
