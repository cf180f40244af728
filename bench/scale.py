# The training step at the scale users train: one CogVideoX-2B or -5B block (width, heads, 226 text tokens, 60x90
# latents -> 1350 tokens per frame, as the real model; one layer, since the blocks are identical and per-layer
# figures scale) under every layout, at >= 16k tokens. Three parts, every row kept in one JSON file:
#
#   steps    per layout (cp x tp x ulysses : activation checkpointing): fwd+bwd time (the slowest rank of each
#            repeat), speedup vs cp=1, bytes each rank sent (all traffic: parallel/all_traffic.py), and per-rank
#            memory split into parameters, gradients, AdamW state, the activations the forward keeps for the backward,
#            and the step's peak; the planner's prediction (parallel/memory_model.py) beside the measured peak.
#   frames   the per-rank peak at several frame counts per layout, the line it follows, and the largest number of
#            latent frames each layout trains under a per-rank cap.
#   overlap  per strategy, one attention call (the model's token layout, 8 heads) three ways: as it runs, with the
#            transfers removed (compute only) and with the attention kernels removed (communication only); the share
#            of communication time hidden behind compute = (compute + communication - both) / communication.
#
#   python bench/scale.py --json bench/results/scale.json   # 2b and 5b steps, 2b frames and overlap (~95 min here)
#   python bench/scale.py --part steps --shapes 2b --layouts 1x1x1:none,2x1x1:none --repeats 1
#   python bench/scale.py --part overlap --overlap-layout short --repeats 20 --json bench/results/scale.json
#   python bench/scale.py --report bench/results/scale.json                 # tables and targets of a saved run
#
# One thread per rank, fp32, gloo; memory is malloc's live bytes read after every op (parallel/memory_probe.py),
# which MALLOC_KEEP (below) does not change: it keeps freed memory for reuse, it does not count it as live.
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import fmt_ratio, ratio, spread, verdict  # noqa: E402

from cpdit import CogVideoXConfig, CogVideoXDiT  # noqa: E402
from launch.spawn import spawn_ranks  # noqa: E402
from parallel.all_traffic import count_all_traffic  # noqa: E402
from parallel.comm import BYTES  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402
from parallel.memory_model import Workload, estimate_memory  # noqa: E402
from parallel.memory_probe import MallocPeak, _local_bytes, malloc_live  # noqa: E402
from parallel.parallelize import materialize, parallelize  # noqa: E402

PRESETS = {"2b": "cogvideox-2b", "5b": "cogvideox-5b", "toy": "tiny"}  # toy: the smoke test's shape
LATENT = {"2b": (60, 90), "5b": (60, 90), "toy": (8, 8)}  # latent H, W (480x720 pixels / 8)
TEXT = {"2b": 226, "5b": 226, "toy": 16}
FRAMES = {"2b": 12, "5b": 12, "toy": 4}  # 2b, 5b: 12 x 1350 + 226 = 16426 tokens
LAYOUTS = {  # cp x tp x ulysses : activation checkpointing (dp = 1: every layout computes the same step)
    "2b": "1x1x1:none,2x1x1:none,2x1x2:none,1x2x1:none,2x1x1:full,4x1x1:none,4x1x4:none,4x1x2:none,2x2x1:none,"
    "4x1x1:full",
    "5b": "1x1x1:none,2x1x1:none",
    "toy": "1x1x1:none,2x1x1:none,2x1x2:none,1x2x1:none,2x1x1:full",
}
SWEEP = {"2b": (4, 8), "toy": (8,)}  # frame counts of the frames part (the steps part adds FRAMES)
SWEEP_LAYOUTS = "1x1x1:none,2x1x1:none,4x1x1:none,4x1x4:none"
# Freed memory stays in the process (no mmap for large blocks, no trimming), as CUDA's caching allocator keeps it on
# a GPU: with glibc's defaults every activation above 32 MiB is a fresh mmap whose pages fault in on first touch, and
# on this machine that costs 20x more once about 4 GiB are in use (a 256 MiB fill: 0.1 s below, 2 s above), which
# charged the larger layouts' steps with seconds of page faults in elementwise ops (a 252 MiB GELU: 0.17 s alone,
# 1.9 s in a cp=2 rank). Step 0 of every layout grows the heap and is not timed.
MALLOC_KEEP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
CAP_GIB = 16.0  # the per-rank cap of the max-frames table (this machine has 23 GiB)
OVERLAP = {"heads": 8, "dim": 64}  # the overlap part: one attention call of 8 heads x 64
# Its token layouts (frames, tokens per frame, text tokens): the model's, where on this machine the transfers are
# 1-2% of the call, and a short one, where they are a sizeable share and the overlap can be resolved.
OVERLAP_LAYOUTS = {"model": None, "short": (8, 128, 16)}
STRATEGIES = "2:ring,2:ulysses,4:ring,4:ulysses,4:usp"


def _config(shape: str) -> CogVideoXConfig:
    return CogVideoXConfig.preset(PRESETS[shape], num_layers=1)


def _slowest(rows: list[dict], key: str) -> list[float]:
    return [max(ts) for ts in zip(*(r[key] for r in rows), strict=True)]


# ---- steps and frames -------------------------------------------------------------------------------------------
def _step_worker(rank, world, shape, frames, cp, tp, ulysses, ac, repeats, out):
    cfg = _config(shape)
    dims = ParallelDims(world, cp_size=cp, model_parallel_size=tp, ulysses_size=ulysses)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = CogVideoXDiT(cfg)
    parallelize(model, dims, mesh, activation_checkpointing=ac)
    materialize(model, "cpu", seed=0)
    with torch.no_grad():  # non-zero adaLN/output weights so every part of the block really computes
        for p in model.parameters():
            p.add_(0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # AdamW's state exists from here on, as in every step after the first
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    h, w = LATENT[shape]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, frames, cfg.in_channels, h, w, generator=g)
    text = torch.randn(1, TEXT[shape], cfg.text_embed_dim, generator=g)
    timesteps = torch.tensor([500.0])
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    row = dict(
        params=_local_bytes(model.parameters()),
        optimizer=_local_bytes(states),
        fwd=[],
        fwdbwd=[],
        opt=[],
        saved=[],
        peak=[],
        sent=0,
    )
    for i in range(repeats + 1):  # step 0 warms malloc's heap up (and counts every byte sent); not timed
        BYTES.reset()
        dist.barrier()
        with count_all_traffic() if i == 0 else nullcontext(), MallocPeak() as probe:
            t0 = time.perf_counter()
            loss = model(latents, text, timesteps, return_local=True).square().mean()
            t1 = time.perf_counter()
            saved = malloc_live() - probe.start  # what the forward keeps for the backward (and the loss)
            loss.backward()
            dist.barrier()
            t2 = time.perf_counter()
            row["grads"] = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
        if i == 0:
            row["sent"] = BYTES.sent
        del loss
        if i == 0:
            continue
        row["fwd"].append(t1 - t0)
        row["fwdbwd"].append(t2 - t0)
        row["opt"].append(t3 - t2)
        row["saved"].append(saved)
        row["peak"].append(probe.peak)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        merged = {k: max(r[k] for r in rows) for k in ("params", "optimizer", "grads", "sent")}
        merged.update({k: _slowest(rows, k) for k in ("fwd", "fwdbwd", "opt")})
        merged.update({k: [max(v) for v in zip(*(r[k] for r in rows), strict=True)] for k in ("saved", "peak")})
        Path(out).write_text(json.dumps(merged))
    del model, optimizer, mesh


def _layout(item: str) -> tuple[int, int, int, str]:
    layout, ac = item.split(":")
    cp, tp, ulysses = (int(v) for v in layout.split("x"))
    return cp, tp, ulysses, ac


def run_step(shape: str, frames: int, item: str, repeats: int, part: str) -> dict:
    cp, tp, ulysses, ac = _layout(item)
    cfg = _config(shape)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        spawn_ranks(_step_worker, cp * tp, shape, frames, cp, tp, ulysses, ac, repeats, str(out), directory=tmp)
        row = json.loads(out.read_text())
    h, w = LATENT[shape]
    dims = ParallelDims(cp * tp, cp, tp, ulysses)
    predicted = estimate_memory(cfg, Workload(frames, h, w, TEXT[shape]), dims, ac, foreach=False)
    tokens = TEXT[shape] + frames * (h // cfg.patch_size) * (w // cfg.patch_size)
    return dict(
        row,
        part=part,
        shape=shape,
        frames=frames,
        tokens=tokens,
        cp=cp,
        tp=tp,
        ulysses=ulysses,
        ac=ac,
        strategy=_strategy(cp, ulysses),
        predicted=predicted.total,
        flops=_step_flops(cfg, tokens),
    )


def _strategy(cp: int, ulysses: int) -> str:
    return "-" if cp == 1 else ("ring" if ulysses == 1 else "ulysses" if ulysses == cp else "usp")


def _step_flops(cfg: CogVideoXConfig, tokens: int) -> float:
    """fwd+bwd FLOPs of the blocks (3 x forward): q/k/v, out, feed-forward, QK^T and PV (as bench/model.py)."""
    d, f = cfg.hidden_size, cfg.ff_hidden
    return 3.0 * cfg.num_layers * (2 * tokens * d * 4 * d + 4 * tokens * d * f + 4 * tokens * tokens * d)


# ---- overlap ----------------------------------------------------------------------------------------------------
def _no_transfer():
    """Compute only: parallel/comm.py's P2P and all-to-all post nothing; their send buffers are still built and
    their receive buffers are zeroed (deterministic contents, and a memset where the real call copies)."""
    originals = (dist.batch_isend_irecv, dist.all_to_all_single)

    def batch_isend_irecv(ops):
        for op in ops:
            if op.op is dist.irecv:
                op.tensor.zero_()
        return []

    dist.batch_isend_irecv = batch_isend_irecv
    dist.all_to_all_single = lambda output, *args, **kwargs: output.zero_()
    return lambda: (setattr(dist, "batch_isend_irecv", originals[0]), setattr(dist, "all_to_all_single", originals[1]))


def _no_kernels():
    """Communication only: the attention kernels return zeros of their shapes (the bookkeeping around them stays)."""
    import parallel.attention.blocks as blocks

    originals = (blocks.block_forward, blocks.block_backward)

    def forward(q, k, v, scale, bias=None):
        return q.new_zeros(*q.shape[:-1], v.shape[-1]), q.new_zeros(q.shape[:-1], dtype=torch.float32)

    blocks.block_forward = forward
    blocks.block_backward = lambda dout, q, k, v, *rest: (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    return lambda: (setattr(blocks, "block_forward", originals[0]), setattr(blocks, "block_backward", originals[1]))


def _overlap_worker(rank, world, strategy, frames, tpf, text_len, repeats, out):
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.attention import context_parallel_attention
    from parallel.sequence import SequencePlan

    ulysses = {"ring": 1, "ulysses": world, "usp": 2}[strategy]
    mesh = init_device_mesh("cpu", (world // ulysses, ulysses), mesh_dim_names=("cp_ring", "cp_ulysses"))
    plan = SequencePlan(frames, tpf, text_len, mesh)
    g = torch.Generator().manual_seed(0)
    shape = (1, OVERLAP["heads"], text_len + frames * tpf, OVERLAP["dim"])
    with torch.no_grad():
        q, k, v, dout = (plan.shard(torch.randn(shape, generator=g), 2).contiguous() for _ in range(4))

    def call():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        context_parallel_attention(qq, kk, vv, plan, strategy=strategy).backward(dout)

    call()  # warms malloc's heap up
    times = {"both": [], "compute": [], "comm": []}
    for _ in range(repeats):
        for mode in times:
            restore = {"both": lambda: lambda: None, "compute": _no_transfer, "comm": _no_kernels}[mode]()
            try:
                dist.barrier()
                t0 = time.perf_counter()
                call()
                times[mode].append(time.perf_counter() - t0)
            finally:
                restore()
            dist.barrier()
    rows = [None] * world
    dist.all_gather_object(rows, times)
    if rank == 0:
        Path(out).write_text(json.dumps({m: _slowest(rows, m) for m in times}))
    del mesh


def run_overlap(shape: str, item: str, repeats: int, layout: str = "model") -> dict:
    cp, strategy = item.split(":")
    cfg = _config(shape)
    h, w = LATENT[shape]
    frames, tpf, text = OVERLAP_LAYOUTS[layout] or (
        FRAMES[shape],
        (h // cfg.patch_size) * (w // cfg.patch_size),
        TEXT[shape],
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        spawn_ranks(_overlap_worker, int(cp), strategy, frames, tpf, text, repeats, str(out), directory=tmp)
        times = json.loads(out.read_text())
    return dict(
        times,
        part="overlap",
        shape=shape,
        layout=layout,
        cp=int(cp),
        strategy=strategy,
        frames=frames,
        tpf=tpf,
        text=text,
        tokens=text + frames * tpf,
        **OVERLAP,
    )


# ---- report -----------------------------------------------------------------------------------------------------
MiB, GiB = 2**20, 2**30


def _name(r: dict) -> str:
    return f"cp{r['cp']}" + (f" {r['strategy']}" if r["cp"] > 1 else "") + (f" tp{r['tp']}" if r["tp"] > 1 else "")


def memory_error(r: dict) -> float:
    """A step row's prediction error: predicted / measured peak (parameters, AdamW state and the step's peak) - 1."""
    return r["predicted"] / (r["params"] + r["optimizer"] + statistics.median(r["peak"])) - 1


def steps_table(rows: list[dict], shape: str) -> list[str]:
    rows = [r for r in rows if r["part"] == "steps" and r["shape"] == shape]
    if not rows:
        return []
    base = next(r for r in rows if r["cp"] == r["tp"] == 1 and r["ac"] == "none")
    out = [
        f"\n{shape}: one block, {rows[0]['frames']} latent frames, {rows[0]['tokens']} tokens; fwd+bwd of the slowest "
        f"rank, median [min-max] of {len(base['fwdbwd'])} repeats; memory per rank in MiB (largest rank, median of the "
        "repeats)\n",
        "| layout | AC | ranks | fwd+bwd s | speedup vs cp=1 | GFLOP/s/rank | MiB sent/rank | params | grads | AdamW | "
        "saved activations | vs cp=1 | peak | predicted | error |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        world = r["cp"] * r["tp"]
        saved, peak = statistics.median(r["saved"]), r["params"] + r["optimizer"] + statistics.median(r["peak"])
        base_saved = statistics.median(base["saved"])
        gflops = r["flops"] / statistics.median(r["fwdbwd"]) / world / 1e9
        out.append(
            f"| {_name(r)} | {r['ac']} | {world} | {spread(r['fwdbwd'])} | "
            f"{fmt_ratio(ratio(base['fwdbwd'], r['fwdbwd']))} | {gflops:.1f} | {r['sent'] / MiB:.1f} | "
            f"{r['params'] / MiB:.0f} | {r['grads'] / MiB:.0f} | "
            f"{r['optimizer'] / MiB:.0f} | {saved / MiB:.0f} | {saved / base_saved:.2f} | {peak / MiB:.0f} | "
            f"{r['predicted'] / MiB:.0f} | {memory_error(r):+.1%} |"
        )
    for strategy in ("ring", "ulysses"):
        r = next(
            (r for r in rows if r["cp"] == 2 and r["tp"] == 1 and r["ac"] == "none" and r["strategy"] == strategy), None
        )
        if r:
            sp = ratio(base["fwdbwd"], r["fwdbwd"])
            out.append(f"- {shape} cp=2 {strategy} fwd+bwd >= 1.8x cp=1: {fmt_ratio(sp)}: {verdict(sp, 1.8)}")
    for r in rows:
        if r["cp"] == 4 and r["tp"] == 1 and r["ac"] == "none":
            share = statistics.median(r["saved"]) / statistics.median(base["saved"])
            out.append(
                f"- {shape} cp=4 {r['strategy']} saved activations <= 0.30x cp=1: {share:.3f}x: "
                f"{'met' if share <= 0.30 else 'not met'}"
            )
    return out


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line peak = a + b * frames."""
    n = len(points)
    mx, my = sum(f for f, _ in points) / n, sum(p for _, p in points) / n
    b = sum((f - mx) * (p - my) for f, p in points) / sum((f - mx) ** 2 for f, _ in points)
    return my - b * mx, b


def frames_table(rows: list[dict], shape: str, cap: float) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["part"] in ("steps", "frames") and r["shape"] == shape and r["tp"] == 1 and r["ac"] == "none":
            groups.setdefault((r["cp"], r["ulysses"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["frames"] for r in v}) >= 2}
    if not groups:
        return []
    out = [
        f"\n{shape}: per-rank peak (parameters + AdamW state + the step's peak above them) at several frame counts, "
        f"the line through them, and the most latent frames under a {cap:g} GiB per-rank cap\n",
        "| layout | peak MiB at frames | MiB fixed + MiB per frame | worst residual | max frames |",
        "|---|---|---|---|---|",
    ]
    most = {}
    for (cp, ulysses), rs in sorted(groups.items()):
        pts = sorted({r["frames"]: r["params"] + r["optimizer"] + statistics.median(r["peak"]) for r in rs}.items())
        a, b = _fit(pts)
        worst = max(abs(p - (a + b * f)) / p for f, p in pts)
        most[(cp, ulysses)] = (cap * GiB - a) / b
        at = ", ".join(f"{p / MiB:.0f} @ {f}" for f, p in pts)
        out.append(
            f"| {_name(rs[0])} | {at} | {a / MiB:.0f} + {b / MiB:.1f} F | {worst:.1%} | {most[(cp, ulysses)]:.0f} |"
        )
    base = most.get((1, 1))
    for (cp, ulysses), m in sorted(most.items()):
        if cp == 4 and base:
            out.append(
                f"- {shape} max frames at {cp=} ({_strategy(cp, ulysses)}) >= 3.6x cp=1 under {cap:g} GiB: "
                f"{m / base:.2f}x: {'met' if m / base >= 3.6 else 'not met'}"
            )
    return out


def overlap_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["part"] == "overlap"]
    if not rows:
        return []
    r0 = rows[0]
    out = [
        f"\nCommunication overlap: one attention fwd+bwd, {r0['heads']} heads x {r0['dim']}; slowest rank, median "
        f"[min-max] of the repeats. hidden = (compute + communication - both) / communication, from the medians, "
        "shown where there are at least 5 repeats and the communication-only time exceeds the interquartile range of "
        "the compute-only repeats (otherwise the share cannot be told from noise)\n",
        "| tokens (frames x per frame + text) | strategy | cp | repeats | both s | compute only s | communication "
        "only s | communication / compute | exposed s (both - compute) | hidden |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        both, comp, comm = (statistics.median(r[k]) for k in ("both", "compute", "comm"))
        resolved = False
        if len(r["compute"]) >= 5:  # quantiles need 2 points; the share needs more to stand above noise
            q1, _, q3 = statistics.quantiles(r["compute"], n=4, method="inclusive")
            resolved = comm > q3 - q1
        hidden = f"{(comp + comm - both) / comm:.0%}" if resolved else "not resolved"
        frames, tpf, text = r.get("frames", 12), r.get("tpf", 1350), r.get("text", 226)
        out.append(
            f"| {r['tokens']} ({frames} x {tpf} + {text}) | {r['strategy']} | {r['cp']} | {len(r['both'])} | "
            f"{spread(r['both'])} | {spread(r['compute'])} | {spread(r['comm'])} | {comm / comp:.1%} | "
            f"{both - comp:+.3f} | {hidden} |"
        )
    return out


def report(rows: list[dict], cap: float = CAP_GIB) -> str:
    out = []
    for shape in ("toy", "2b", "5b"):
        out += steps_table(rows, shape) + frames_table(rows, shape, cap)
    return "\n".join(out + overlap_table(rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Whole-model training step at CogVideoX-2B/5B block shapes per layout.")
    p.add_argument("--part", default="steps,frames,overlap")
    p.add_argument("--shapes", default="2b,5b")
    p.add_argument("--layouts", default=None, help="cp x tp x ulysses : AC, comma-separated (default: per shape)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--strategies", default=STRATEGIES, help="overlap part: cp:strategy, comma-separated")
    p.add_argument("--overlap-layout", default="model", choices=sorted(OVERLAP_LAYOUTS))
    p.add_argument("--cap-gib", type=float, default=CAP_GIB)
    p.add_argument("--json", default=None, help="rows are added here as they are measured (a rerun appends)")
    p.add_argument("--report", default=None, help="print the tables of a --json file and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text()), args.cap_gib))
        return
    os.environ.update(MALLOC_KEEP)  # the spawned ranks' glibc reads it when they start
    path = Path(args.json) if args.json else None
    rows = json.loads(path.read_text()) if path and path.exists() else []

    def keep(row):
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_rank",)}), flush=True)
        if path:
            path.write_text(json.dumps(rows, indent=1))

    parts, shapes = args.part.split(","), args.shapes.split(",")
    for shape in shapes:
        if "steps" in parts:
            for item in (args.layouts or LAYOUTS[shape]).split(","):
                keep(run_step(shape, FRAMES[shape], item, args.repeats, "steps"))
        if "frames" in parts and shape in SWEEP:
            for item in SWEEP_LAYOUTS.split(","):
                for frames in SWEEP[shape]:
                    keep(run_step(shape, frames, item, 1, "frames"))
    if "overlap" in parts:
        for item in args.strategies.split(","):
            keep(run_overlap(shapes[0], item, args.repeats, args.overlap_layout))
    print(f"\nfp32, 1 thread per rank, torch {torch.__version__}, CPU/gloo\n" + report(rows, args.cap_gib))


if __name__ == "__main__":
    main()
