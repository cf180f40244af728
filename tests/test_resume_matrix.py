# A checkpoint resumes exactly under a layout change. One chain of real `cpdit-launch train` runs, each resuming the
# previous run's last checkpoint under another layout and training two more steps:
#
#   A  cp2 x tp2, ring (4 ranks)           the reference layout, also run uninterrupted for every step
#   B  cp2, tp1 (2 ranks)                  tp 2 -> 1
#   C  cp4, ring (4 ranks)                 cp 2 -> 4
#   D  cp4, ulysses                        ring -> ulysses
#   E  cp4 = ring 2 x ulysses 2 (usp)      ulysses -> usp
#   F  cp2, ring, dp2                      usp -> ring, cp 4 -> 2, dp 1 -> 2
#   G  cp2, dp2, fsdp=false                fsdp on -> off
#   H  dp4 = 2 replicas x 2 shards (HSDP)  fsdp off -> HSDP, cp 2 -> 1
#   I  cp2 x tp2, ring (4 ranks)           HSDP -> FSDP, dp 4 -> 1, tp 1 -> 2
#
# At every link: the model, optimizer (AdamW moments and step) and EMA state the new layout holds right after the
# resume, unsharded, equal the checkpoint's tensors bit for bit; the step, learning rate and data position continue.
# The global batch is 4 clips in every layout (dp x batch_size), so the data is the same; the links that keep dp = 1
# (B..E) also reproduce the uninterrupted run's losses (fp32: other layouts sum in other orders, hence a tolerance).
# Changing dp changes which data-parallel rank draws which noise and timestep stratum (SAT's uniform sampling), so
# after F the losses are a different (equally valid) trajectory; the resumed state is still exact.
#
# One bucketed link (data.buckets, issue #26): J runs dp=2 x cp=2 with a cp degree per bucket (parallel.dynamic_cp)
# and K resumes its step-2 checkpoint on dp=4 without cp. The state is exact again, and K's micro-batches are the
# next ones of the epoch's bucketed order (rank 0's bucket of each step, as the order has it), with the position
# counting micro-batches (2 steps x 2 + 2 steps x 4 = 12).
import json
import shutil

import pytest
import torch
from job_helpers import launch, losses, metrics
from safetensors.torch import load_file

from launch.job.checkpoint import checkpoint_dir, read_full_state

# the chain fixture runs 10 jobs one after another inside the first test's time limit: 4-5 minutes on 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

COMMON = [
    "data.num_samples=24",
    "checkpoint.every=2",
    "checkpoint.keep_last=1",
    "train.ema_decay=0.9",
    "sample.at_end=false",
    "train.export=false",
    "logging.wandb=false",
    "optim.warmup_steps=2",
    "optim.decay_steps=18",
]  # every link on the reference run's schedule
CHAIN = [  # name, processes, layout overrides
    ("A", 4, ["parallel.cp_size=2", "parallel.model_parallel_size=2", "data.batch_size=4"]),
    ("B", 2, ["parallel.cp_size=2", "parallel.model_parallel_size=1", "data.batch_size=4"]),
    ("C", 4, ["parallel.cp_size=4", "parallel.model_parallel_size=1", "data.batch_size=4"]),
    (
        "D",
        4,
        ["parallel.cp_size=4", "parallel.model_parallel_size=1", "parallel.attention=ulysses", "data.batch_size=4"],
    ),
    (
        "E",
        4,
        [
            "parallel.cp_size=4",
            "parallel.model_parallel_size=1",
            "parallel.ulysses_size=2",
            "parallel.attention=usp",
            "data.batch_size=4",
        ],
    ),
    ("F", 4, ["parallel.cp_size=2", "parallel.model_parallel_size=1", "data.batch_size=2"]),
    ("G", 4, ["parallel.cp_size=2", "parallel.model_parallel_size=1", "parallel.fsdp=false", "data.batch_size=2"]),
    ("H", 4, ["parallel.cp_size=1", "parallel.model_parallel_size=1", "parallel.dp_replicate=2", "data.batch_size=1"]),
    ("I", 4, ["parallel.cp_size=2", "parallel.model_parallel_size=2", "data.batch_size=4"]),
]
STEPS = 2 * len(CHAIN)
SAME_DP_AS_REFERENCE = "ABCDE"
LOSS_RTOL = 1e-6


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    launch(tmp, "reference", *COMMON, *CHAIN[0][2], f"train.steps={STEPS}", nproc=4, timeout=600)
    previous = None
    for i, (name, nproc, layout) in enumerate(CHAIN):
        end = 2 * (i + 1)
        if previous is not None:
            src = checkpoint_dir(tmp / previous / "checkpoints", 2 * i)
            shutil.copytree(src, checkpoint_dir(tmp / name / "checkpoints", 2 * i))
        args = (*COMMON, *layout, f"train.steps={end}", "debug.dump_resumed_state=true")
        # every link must exit 0: a finished job process skips interpreter teardown (launch/lifeline.py exit_now),
        # where gloo's C++ destructors used to abort about 1 run in 30 ("terminate called without an active
        # exception"); no link is rerun
        launch(tmp, name, *args, nproc=nproc)
        previous = name
    return tmp


@pytest.mark.parametrize("link", range(1, len(CHAIN)))
def test_resumed_state_equals_the_checkpoint_bit_for_bit(chain, link):
    name, src = CHAIN[link][0], CHAIN[link - 1][0]
    saved = read_full_state(checkpoint_dir(chain / src / "checkpoints", 2 * link))
    loaded = load_file(str(chain / name / "resumed_state.safetensors"))
    assert set(loaded) == set(saved), (sorted(set(saved) ^ set(loaded)))[:10]
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in saved)
    assert any(k.startswith("ema.") for k in saved)
    for key in sorted(saved):
        assert torch.equal(loaded[key], saved[key]), f"{src} -> {name}: {key} differs after the resume"


@pytest.mark.parametrize("link", range(1, len(CHAIN)))
def test_the_run_continues_where_the_checkpoint_stopped(chain, link):
    """Step, learning rate and data position continue; the resumed run logs exactly its two new steps."""
    name = CHAIN[link][0]
    ref_rows = {r["step"]: r for r in metrics(chain / "reference") if "loss" in r and "event" not in r}
    by_step, rows = losses(chain / name)
    assert sorted(by_step) == [2 * link + 1, 2 * link + 2]
    resume = next(r for r in rows if r.get("event") == "resume")
    assert resume["step"] == 2 * link
    for r in rows:
        if "loss" in r and "event" not in r:
            assert r["lr"] == ref_rows[r["step"]]["lr"]
    n = 2 * link + 2  # steps done; 24 clips = 6 steps of 4 per epoch, whatever the dp x batch split
    meta = json.loads((checkpoint_dir(chain / name / "checkpoints", n) / "meta.json").read_text())
    assert meta["data"] == {"epoch": (n - 1) // 6, "clips": 4 * ((n - 1) % 6 + 1), "batches": 0}


@pytest.mark.parametrize("link", [i for i, c in enumerate(CHAIN) if c[0] in SAME_DP_AS_REFERENCE])
def test_same_dp_links_reproduce_the_uninterrupted_losses(chain, link):
    name = CHAIN[link][0]
    ref, _ = losses(chain / "reference")
    mine, _ = losses(chain / name)
    for step, loss in mine.items():
        assert loss == pytest.approx(ref[step], rel=LOSS_RTOL), (name, step, loss, ref[step])


BUCKETED = [
    "data.buckets=[[9,16,24],[17,16,16],[5,16,16]]",
    "data.token_budget=2300",
    "data.num_samples=48",
    "parallel.model_parallel_size=1",
]
LINK_J = ["parallel.cp_size=2", "parallel.dynamic_cp=true", "parallel.cp_per_bucket=[2,1,1]"]
LINK_K = ["parallel.cp_size=1"]


@pytest.fixture(scope="module")
def bucketed_link(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bucketed_link")
    launch(tmp, "J", *COMMON, *BUCKETED, *LINK_J, "train.steps=2", nproc=4)
    shutil.copytree(checkpoint_dir(tmp / "J" / "checkpoints", 2), checkpoint_dir(tmp / "K" / "checkpoints", 2))
    launch(tmp, "K", *COMMON, *BUCKETED, *LINK_K, "train.steps=4", "debug.dump_resumed_state=true", nproc=4)
    return tmp


def test_a_bucketed_run_resumes_under_another_dp_with_the_next_micro_batches(bucketed_link):
    from launch.job.bucketed import SyntheticBuckets
    from launch.job.buckets import epoch_batches, parse_buckets

    tmp = bucketed_link
    saved = read_full_state(checkpoint_dir(tmp / "J" / "checkpoints", 2))
    loaded = load_file(str(tmp / "K" / "resumed_state.safetensors"))
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    for run, step, batches in (("J", 2, 4), ("K", 4, 12)):
        meta = json.loads((checkpoint_dir(tmp / run / "checkpoints", step) / "meta.json").read_text())
        assert meta["data"] == {"epoch": 0, "clips": 0, "batches": batches}
    buckets = parse_buckets([[9, 16, 24], [17, 16, 16], [5, 16, 16]])
    event = next(r for r in metrics(tmp / "K") if r.get("event") == "buckets")
    sizes = {i: b["micro_batch"] for i, b in enumerate(event["buckets"])}
    order = epoch_batches(SyntheticBuckets("synthetic", 48, buckets, None, 0).bucket_of, sizes, 0, 0)
    names = [buckets[b].name for b, _ in order]
    j, k = losses(tmp / "J")[1], losses(tmp / "K")[1]
    steps = {r["step"]: r["bucket"] for r in j + k if "loss" in r and "event" not in r}
    assert steps == {1: names[0], 2: names[2], 3: names[4], 4: names[8]}  # rank 0 takes the first of each step
