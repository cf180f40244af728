# The plan of each bucket (launch/bucket_plan.py): its tokens and micro-batch under data.token_budget, the cp degree
# parallel.dynamic_cp chooses from the planner's prediction (the smallest that fits the cap with the margin, and
# gives every sub-group a clip), and the budget `cpdit-launch plan` recommends. Pure functions of the config and the
# layout: no processes.
import pytest

from launch.bucket_plan import budget_for, plan_buckets
from launch.config import ConfigError, load_config
from launch.plan import MARGIN
from launch.plan import main as plan_main
from parallel.dims import ParallelDims

GiB = 2**30
BUCKETS = "data.buckets=[[17,16,16],[5,16,16]]"  # 1104 and 336 tokens a clip (tiny model, 16 text tokens)


def _cfg(*extra):
    return load_config(overrides=["model.preset=tiny", BUCKETS, "data.token_budget=3400", *extra])


def test_micro_batches_follow_the_token_budget_and_the_degree_is_the_smallest_that_fits():
    dims = ParallelDims(4, cp_size=4, model_parallel_size=1)
    # 3 long clips: degree 1 would leave a sub-group without one; at 2 a rank holds half of 2 clips, at 4 a quarter
    # of 3 (ceil(3 / 2) vs 3 / 4 of a clip): the planner tells them apart
    at = {c: plan_buckets(_cfg("parallel.dynamic_cp=true", f"parallel.cp_per_bucket=[{c},1]"), dims, predict=True)
          for c in (2, 4)}  # fmt: skip
    long2, long4 = at[2][0].predicted, at[4][0].predicted
    assert (at[2][0].micro, at[2][1].micro) == (3, 10) and at[2][0].tokens == 1104 and long4 < long2
    cap = int((long4 + long2) / 2 * (1 + MARGIN))  # between the two with the margin
    auto = plan_buckets(_cfg("parallel.dynamic_cp=true"), dims, cap_bytes=cap)
    assert [(p.cp, p.per_rank_clips, p.fits) for p in auto] == [(4, 3, True), (1, 3, True)]  # 3 clips / 4 ranks
    roomy = plan_buckets(_cfg("parallel.dynamic_cp=true"), dims, cap_bytes=int(long2 * (1 + MARGIN)) + 1)
    assert [p.cp for p in roomy] == [2, 1]
    fixed = plan_buckets(_cfg(), dims)
    assert [(p.cp, p.predicted) for p in fixed] == [(4, None), (4, None)]
    no_budget = plan_buckets(load_config(overrides=["model.preset=tiny", BUCKETS, "data.batch_size=2"]), dims)
    assert [p.micro for p in no_budget] == [2, 2]


def test_a_degree_that_leaves_a_sub_group_without_a_clip_is_refused():
    dims = ParallelDims(4, cp_size=4, model_parallel_size=1)
    with pytest.raises(ConfigError, match=r"cp_per_bucket\[0\]=1 .*4 sub-groups but micro-batches of 3 clip"):
        plan_buckets(_cfg("parallel.dynamic_cp=true", "parallel.cp_per_bucket=[1,1]"), dims)


def test_the_recommended_budget_is_the_largest_under_which_every_bucket_fits():
    dims = ParallelDims(4, cp_size=2, model_parallel_size=2)
    cfg = _cfg()
    cap = int(0.02 * GiB)
    budget, clips = budget_for(cfg, dims, cap)
    assert budget > 0 and clips == [budget // 1104, budget // 336]

    def fits(b):
        return all(p.fits for p in plan_buckets(_cfg(f"data.token_budget={b}"), dims, predict=True, cap_bytes=cap))

    assert fits(budget)
    limiting = [t for t, n in zip((1104, 336), clips, strict=True) if n * t == budget][0]
    assert not fits(budget + limiting)  # one clip more of the bucket that sets the budget does not fit


def test_plan_reports_each_bucket_and_the_budget(capsys):
    code = plan_main(
        ["--nproc-per-node", "4", "--device-memory-gib", "0.05", "model.preset=tiny", BUCKETS,
         "data.token_budget=3400", "parallel.dynamic_cp=true", "parallel.model_parallel_size=1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "| 17x16x16 | 1104 | 3 |" in out and "| 5x16x16 | 336 | 10 | 1 |" in out
    assert "recommended data.token_budget=" in out and "parallel.dynamic_cp: the smallest degree that fits" in out


def test_the_bench_readme_table_is_the_committed_results():
    """bench/README.md's bench/buckets.py numbers are what bench/results/buckets.json holds (the report rebuilt
    from it): each run's useful tokens/s and ratios, and every bucket's predicted and measured memory."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "bench"))
    from buckets import report

    raw = json.loads((root / "bench/results/buckets.json").read_text())
    text = report({k: raw[k] for k in ("padded", "buckets", "dynamic")})
    readme = (root / "bench/README.md").read_text()
    for line in text.splitlines():
        if line.startswith(("| padded |", "| buckets |", "| dynamic |")) and "x [" in line:
            cells = line.split(" | ")
            if len(cells) == 8:  # the runs' table: from the useful tokens on
                assert " | ".join(cells[2:]) in readme, line
    for b in raw["dynamic"]["buckets"]:
        p, m = b["predicted"], b["measured"]
        row = f"| {p / 2**20:.1f} | {m / 2**20:.1f} | {p / m - 1:+.1%} |"
        assert row in readme, row
