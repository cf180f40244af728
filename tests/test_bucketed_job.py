# Buckets in the real job (`cpdit-launch train` with data.buckets): a step's clips, noise and loss do not depend on
# the layout or on the cp degree a bucket runs at. The same bucketed run on 2 processes (dp=2, no cp), on 4 at the
# fixed cp=2, and on 4 with parallel.dynamic_cp (pinned degrees, and the planner's own choice, FSDP2 and without)
# logs the same loss and gradient norm at every step (fp32: sums in other orders, hence the tolerance); metrics.jsonl
# names each step's bucket, micro-batch and cp degree, and the start records each bucket's plan.
import pytest
from job_helpers import launch, losses, metrics

pytestmark = pytest.mark.slow  # five short jobs

BUCKETS = ["data.buckets=[[9,16,24],[17,16,16],[5,16,16]]", "data.token_budget=2300", "data.num_samples=48"]
COMMON = [*BUCKETS, "train.steps=6", "train.log_every=1", "sample.at_end=false", "train.export=false"]
RUNS = {  # name: (processes, overrides)
    "dp2": (2, ["parallel.cp_size=1", "parallel.model_parallel_size=1"]),
    "cp2": (4, ["parallel.cp_size=2", "parallel.model_parallel_size=1"]),
    "pinned": (4, ["parallel.cp_size=2", "parallel.model_parallel_size=1", "parallel.dynamic_cp=true",
                   "parallel.cp_per_bucket=[2,1,1]"]),
    "planned": (4, ["parallel.cp_size=2", "parallel.model_parallel_size=1", "parallel.dynamic_cp=true"]),
    "planned_allreduce": (4, ["parallel.cp_size=2", "parallel.model_parallel_size=1", "parallel.dynamic_cp=true",
                              "parallel.fsdp=false", "parallel.cp_per_bucket=[1,2,1]"]),
}  # fmt: skip
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bucketed")
    for name, (nproc, extra) in RUNS.items():
        launch(tmp, name, *COMMON, *extra, nproc=nproc)
    return tmp


def _steps(run_dir):
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r and "event" not in r}


def test_every_layout_and_cp_degree_takes_the_same_steps(runs):
    ref = _steps(runs / "dp2")
    assert sorted(ref) == list(range(1, 7))
    for name in RUNS:
        got = _steps(runs / name)
        for step, row in ref.items():
            for key in ("loss", "grad_norm"):
                assert got[step][key] == pytest.approx(row[key], rel=RTOL), (name, step, key)
            assert got[step]["bucket"] == row["bucket"] and got[step]["micro_batch"] == row["micro_batch"]


def test_metrics_name_each_steps_bucket_and_cp_degree(runs):
    by_bucket = {"9x16x24": 2, "17x16x16": 1, "5x16x16": 1}  # the pinned degrees
    for step in _steps(runs / "pinned").values():
        assert step["cp"] == by_bucket[step["bucket"]] and step["tokens_per_s"] > 0
    assert {s["cp"] for s in _steps(runs / "cp2").values()} == {2}
    event = next(r for r in metrics(runs / "planned") if r.get("event") == "buckets")
    rows = {b["bucket"]: b for b in event["buckets"]}
    assert {b: (r["tokens"], r["micro_batch"]) for b, r in rows.items()} == {
        "9x16x24": (880, 2), "17x16x16": (1104, 2), "5x16x16": (336, 6)
    }  # fmt: skip
    assert sum(r["clips"] for r in rows.values()) == 48 and all(r["predicted_mib"] > 0 for r in rows.values())
    for step in _steps(runs / "planned").values():  # the planner's degree of each bucket is the one it ran at
        assert step["cp"] == rows[step["bucket"]]["cp"]
    assert losses(runs / "planned")[0]
