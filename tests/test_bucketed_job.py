# Buckets in the real job (`cpdit-launch train` with data.buckets): a step's clips, noise and loss do not depend on
# the layout or on the cp degree a bucket runs at. The same bucketed run on 2 processes (dp=2, no cp), on 4 at the
# fixed cp=2, and on 4 with parallel.dynamic_cp (pinned degrees, and the planner's own choice, FSDP2 and without)
# logs the same loss and gradient norm at every step (fp32: sums in other orders, hence the tolerance); metrics.jsonl
# names each step's bucket, micro-batch and cp degree, and the start records each bucket's plan.
import pytest
from job_helpers import launch, losses, metrics

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


@pytest.mark.slow  # five short jobs
def test_every_layout_and_cp_degree_takes_the_same_steps(runs):
    ref = _steps(runs / "dp2")
    assert sorted(ref) == list(range(1, 7))
    for name in RUNS:
        got = _steps(runs / name)
        for step, row in ref.items():
            for key in ("loss", "grad_norm"):
                assert got[step][key] == pytest.approx(row[key], rel=RTOL), (name, step, key)
            assert got[step]["bucket"] == row["bucket"] and got[step]["micro_batch"] == row["micro_batch"]


@pytest.mark.slow
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


def _loss_run():
    """What launch/job/loss.py micro_batch_loss reads of a run: one process, the pixel stage, a float64 tiny model."""
    from types import SimpleNamespace

    import torch

    from cpdit import CogVideoXConfig, CogVideoXDiT
    from cpdit.diffusion import Schedule
    from cpdit.first_stage import PixelStage
    from parallel.dims import ParallelDims
    from parallel.parallelize import Parallelized

    torch.manual_seed(0)
    model = CogVideoXDiT(CogVideoXConfig.preset("tiny", in_channels=3, out_channels=3, text_embed_dim=8)).double()
    dims = ParallelDims(1)
    text = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(seed=3, ucg_rate=0.0)),
        device=torch.device("cpu"),
        dims=dims,
        env=SimpleNamespace(rank=0),
        first_stage=PixelStage(),
        cache=None,
        image_conditioned=False,
        modules=SimpleNamespace(dit=model, encode=lambda captions: text.expand(len(captions), -1, -1)),
        schedule=Schedule.zero_snr(1000, 1.0),
        frame_causal=False,
        autocast=torch.autocast("cpu", enabled=False),
        parallel=Parallelized(dims, None, model, None),
    )


def test_the_loss_is_the_mean_over_the_steps_clips_of_each_clips_own_mean():
    """A step of two micro-batches of different shapes (2 clips of 5 frames of 8x12, 1 of 9 frames of 8x8): the sum
    of launch/job/loss.py's shares is the mean of the three clips' own mean losses, each clip computed alone with
    its own draws (its index in the step) — not a mean over tokens, which would weigh the longer clip more."""
    import torch

    from launch.job.data import MicroBatch
    from launch.job.loss import micro_batch_loss

    run = _loss_run()
    g = torch.Generator().manual_seed(0)
    short = torch.rand(2, 5, 3, 8, 12, generator=g, dtype=torch.float64) * 2 - 1
    long = (torch.rand(1, 9, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1) * 4  # a clip of another loss

    def share(video, first, samples, micro):
        ids = list(range(first, first + len(video)))
        batch = MicroBatch(video, ["c"] * len(video), ids, first, samples, 0)
        return micro_batch_loss(run, 0, micro, batch).item()

    step = share(short, 0, 3, 0) + share(long, 2, 3, 1)
    alone = [share(short[:1], 0, 1, 0), share(short[1:], 1, 1, 0), share(long, 2, 1, 1)]
    assert step == pytest.approx(sum(alone) / 3, rel=1e-6)  # the job computes the loss in fp32
    by_tokens = (alone[0] * short[0].numel() + alone[1] * short[1].numel() + alone[2] * long[0].numel()) / (
        2 * short[0].numel() + long[0].numel()
    )
    assert abs(step - by_tokens) > 0.05 * step  # the two weightings differ on this step (by 8%)


I2V_VAE = [  # an image-to-video model on the CogVideoX VAE (tiny): the first stage encodes a micro-batch over the
    # whole cp group, each sub-group takes its clips' latents, and the rank of a sub-group holding latent frame 0
    # encodes their noised first frames
    "first_stage.kind=vae",
    "first_stage.preset=tiny",
    "data.num_frames=9",
    "model.in_channels=8",
    "model.out_channels=4",
    "model.pos_embedding=rope",
    "data.buckets=[[9,16,16],[17,16,24]]",
    "data.batch_size=2",
    "data.num_samples=16",
    "train.steps=4",
    "train.log_every=1",
    "sample.at_end=false",
    "train.export=false",
    "parallel.model_parallel_size=1",
]


@pytest.mark.slow
def test_image_to_video_on_the_vae_takes_the_same_steps_at_any_degree(tmp_path):
    launch(tmp_path, "fixed", *I2V_VAE, "parallel.cp_size=2", nproc=4)
    dyn = ["parallel.cp_size=2", "parallel.dynamic_cp=true", "parallel.cp_per_bucket=[1,2]"]
    launch(tmp_path, "dynamic", *I2V_VAE, *dyn, nproc=4)
    fixed, dynamic = _steps(tmp_path / "fixed"), _steps(tmp_path / "dynamic")
    assert sorted(fixed) == [1, 2, 3, 4] and {s["cp"] for s in dynamic.values()} == {1, 2}
    for step, row in fixed.items():
        for key in ("loss", "grad_norm"):
            assert dynamic[step][key] == pytest.approx(row[key], rel=RTOL), (step, key)
