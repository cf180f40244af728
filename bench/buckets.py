# What buckets and a cp degree per batch buy (issue #26 §3): useful tokens/s of one epoch of a realistic clip mix on
# 4 ranks (cp=4, FSDP2, fp32, CPU/gloo), at the mid width of bench/model.py (hidden 768, 12 heads, 4 blocks, 226
# text tokens), three ways:
#
#   (a) padded   every clip padded (or cut) to the largest bucket, 2 clips per micro-batch (what users do today)
#   (b) buckets  each micro-batch one bucket, as many clips as data.token_budget allows, every bucket at cp=4
#   (c) dynamic  the same micro-batches, each bucket at the cp degree launch/bucket_plan.py chooses
#
# The mix, in latent frames (pixel frames through the CogVideoX VAE, 4x in time and 8x in space): 4/5/9/13 frames
# (13/17/33/49 pixel frames) at two aspect ratios, 16x16 (128x128 px) and 12x20 (96x160 px), weighted towards short
# clips as real datasets are: 40/30/20/10% by length, half of each landscape. The token budget is two of the
# largest clips (2 x 1058 tokens per cp group). Useful tokens are each clip's own (226 text + its frames' patches),
# never the padding. Every run takes the same clips; each repeat is one optimizer step per micro-batch (forward,
# backward, AdamW), timed as the slowest rank's. Printed: useful tokens/s (median [min-max] of the repeats) with
# ratios, the bytes each rank sent per useful token, and per bucket the planner's micro-batch and cp degree beside
# its predicted and measured peak memory (malloc's live bytes, parallel/memory_probe.py; the largest rank).
#
#   python bench/buckets.py                               # 3 repeats, 24 clips
#   python bench/buckets.py --json bench/results/buckets.json
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import fmt_ratio, ratio, spread  # noqa: E402

from cpdit import CogVideoXDiT  # noqa: E402
from launch.bucket_plan import plan_buckets  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.job.buckets import epoch_batches  # noqa: E402
from launch.job.build import model_config  # noqa: E402
from launch.spawn import spawn_ranks  # noqa: E402
from parallel.all_traffic import count_all_traffic  # noqa: E402
from parallel.comm import BYTES  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402
from parallel.dynamic_cp import enable_dynamic_cp, sub_group_index  # noqa: E402
from parallel.memory_probe import MallocPeak, _local_bytes  # noqa: E402
from parallel.parallelize import Parallelized, materialize, parallelize  # noqa: E402

WORLD, CP = 4, 4
LENGTHS = {4: 0.4, 5: 0.3, 9: 0.2, 13: 0.1}  # latent frames: share of clips
SHAPES = ((16, 16), (12, 20))  # latent height x width, half each
BUCKETS = [[f, h, w] for f in LENGTHS for h, w in SHAPES]
PADDED = [13, 16, 16]  # the largest bucket (13 x 64 video tokens)
BUDGET = 2 * (226 + 13 * 64)
MID = [
    "model.preset=tiny",
    "model.num_attention_heads=12",
    "model.attention_head_dim=64",
    "model.num_layers=4",
    "model.text_embed_dim=256",
    "train.text_max_length=226",
    "first_stage.kind=pixel",  # the bench feeds latents directly: pixel units are latent units here
    f"parallel.cp_size={CP}",
    "parallel.model_parallel_size=1",
]


def job_config(mode: str):
    if mode == "padded":
        f, h, w = PADDED
        return load_config(overrides=[*MID, f"data.buckets=[[{f},{h},{w}]]", "data.batch_size=2"])
    extra = ["parallel.dynamic_cp=true"] if mode == "dynamic" else []
    return load_config(overrides=[*MID, f"data.buckets={BUCKETS}", f"data.token_budget={BUDGET}", *extra])


def clip_buckets(clips: int, seed: int = 0) -> list[int]:
    """Each clip's bucket (an index into BUCKETS), drawn from the mix."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice(list(LENGTHS), size=clips, p=list(LENGTHS.values()))
    shapes = rng.integers(0, len(SHAPES), size=clips)
    return [BUCKETS.index([int(f), *SHAPES[s]]) for f, s in zip(lengths, shapes, strict=True)]


def useful_tokens(bucket: list[int]) -> int:
    f, h, w = bucket
    return 226 + f * (h // 2) * (w // 2)


def micro_batches(mode: str, bucket_of: list[int], plans) -> list[tuple[int, list[int]]]:
    """(plan index, clips) of one epoch: the job's bucketed order, or the clips in pairs at the padded shape."""
    if mode == "padded":
        return [(0, list(range(k, k + 2))) for k in range(0, len(bucket_of) - 1, 2)]
    return epoch_batches(bucket_of, {i: p.micro for i, p in enumerate(plans)}, seed=0, epoch=0)


def _worker(rank, world, mode, clips, repeats, out):
    cfg = job_config(mode)
    dims = ParallelDims(world, cp_size=CP)
    mesh = dims.build_mesh("cpu")
    plans = plan_buckets(cfg, dims, predict=True)
    m = model_config(cfg)
    with torch.device("meta"):
        model = CogVideoXDiT(m)
    parallelize(model, dims, mesh)
    materialize(model, "cpu", seed=0)
    if mode == "dynamic":
        enable_dynamic_cp(model, dims, [p.cp for p in plans])
    par = Parallelized(dims, mesh, model, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    bucket_of = clip_buckets(clips)
    batches = micro_batches(mode, bucket_of, plans)
    n_step = {b: len(ids) for b, ids in batches}

    def step(b: int, ids: list[int], probe: bool = False) -> tuple[float, int]:
        plan = plans[b]
        f, h, w = plan.bucket.frames, plan.bucket.height, plan.bucket.width
        g = torch.Generator().manual_seed(ids[0])
        x = torch.randn(len(ids), f, m.in_channels, h, w, generator=g)
        text = torch.randn(len(ids), 226, m.text_embed_dim, generator=g)
        t = torch.full((len(ids),), 500.0)
        dist.barrier()
        t0 = time.perf_counter()
        with MallocPeak() as peak, par.cp_degree(plan.cp):
            rows = slice(0, len(ids))
            if plan.cp != dims.cp:
                k, groups = sub_group_index(dims, rank, plan.cp)
                rows = slice(k * len(ids) // groups, (k + 1) * len(ids) // groups)
            par.model(x[rows], text[rows], t[rows], return_local=True).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        took = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return took.item(), peak.peak

    for b in sorted(n_step):  # warm-up: one micro-batch of each bucket (plans, buffers, optimizer state)
        step(b, next(ids for bb, ids in batches if bb == b))
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    static = _local_bytes(model.parameters()) + _local_bytes(states)
    times, peaks, sent = [], {}, 0
    for _ in range(repeats):
        total = 0.0
        BYTES.reset()
        with count_all_traffic():
            for b, ids in batches:
                took, peak = step(b, ids)
                total += took
                peaks[b] = max(peaks.get(b, 0), static + peak)
        sent = max(sent, BYTES.sent)
        times.append(total)
    every = [None] * world
    dist.all_gather_object(every, {"peaks": peaks, "sent": sent})
    if rank == 0:
        useful = sum(useful_tokens(BUCKETS[b]) for b in bucket_of[: sum(len(ids) for _, ids in batches)])
        if mode != "padded":  # the clips the epoch's micro-batches take (a bucket's last few may wait)
            useful = sum(useful_tokens(BUCKETS[bucket_of[i]]) for _, ids in batches for i in ids)
        rows = []
        for i, p in enumerate(plans):
            if i in peaks:
                rows.append(
                    {
                        "bucket": p.bucket.name,
                        "clips": sum(len(ids) for b, ids in batches if b == i),
                        "micro_batch": p.micro,
                        "cp": p.cp,
                        "predicted": p.predicted,
                        "measured": max(e["peaks"][i] for e in every),
                    }
                )
        result = {
            "mode": mode,
            "times": times,
            "useful_tokens": useful,
            "sent_per_rank": max(e["sent"] for e in every),
            "buckets": rows,
        }
        Path(out).write_text(json.dumps(result))
    del model, mesh


def run(mode: str, clips: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spawn_ranks(_worker, WORLD, mode, clips, repeats, str(out), directory=tmp, timeout=3600)
        return json.loads(out.read_text())


def report(results: dict[str, dict]) -> str:
    def tps(r):
        return [r["useful_tokens"] / t for t in r["times"]]

    base, fixed = results["padded"], results["buckets"]
    lines = [
        f"{WORLD} ranks, cp={CP}, FSDP2, fp32, CPU/gloo; mid width; mix {LENGTHS} latent frames x {SHAPES} (half "
        f"each); token budget {BUDGET} per cp group",
        "",
        "| run | clips | useful tokens | seconds/epoch | useful tokens/s | vs (a) padded | vs (b) buckets at cp=4 | "
        "bytes sent/rank/useful token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        # tokens/s ratios: a's time per useful token over this run's
        per_a = [t / base["useful_tokens"] for t in base["times"]]
        per_b = [t / fixed["useful_tokens"] for t in fixed["times"]]
        mine = [t / r["useful_tokens"] for t in r["times"]]
        speed = tps(r)
        lines.append(
            f"| {name} | {sum(b['clips'] for b in r['buckets'])} | {r['useful_tokens']} | {spread(r['times'])} | "
            f"{statistics.median(speed):.0f} [{min(speed):.0f}-{max(speed):.0f}] | {fmt_ratio(ratio(per_a, mine))} | "
            f"{fmt_ratio(ratio(per_b, mine))} | {r['sent_per_rank'] / r['useful_tokens']:.0f} |"
        )
    lines += [
        "",
        "Per bucket: the planner's micro-batch and cp degree, its predicted peak per rank beside the measured one "
        "(MiB; largest rank, largest step of the bucket)",
        "",
        "| run | bucket | clips | micro-batch | cp | predicted | measured | predicted / measured - 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for b in r["buckets"]:
            err = b["predicted"] / b["measured"] - 1 if b["predicted"] else float("nan")
            pred = f"{b['predicted'] / 2**20:.1f}" if b["predicted"] else "-"
            lines.append(
                f"| {name} | {b['bucket']} | {b['clips']} | {b['micro_batch']} | {b['cp']} | {pred} | "
                f"{b['measured'] / 2**20:.1f} | {err:+.1%} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="useful tokens/s of a clip mix: padded, buckets at cp=4, dynamic cp")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args(argv)
    results = {}
    for name, mode in (("padded", "padded"), ("buckets", "buckets"), ("dynamic", "dynamic")):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run(mode, args.clips, args.repeats)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"clips": args.clips, "repeats": args.repeats, **results}, indent=1))


if __name__ == "__main__":
    main()
