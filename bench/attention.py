# Benchmark of context-parallel attention: time, bytes on the wire, per-rank memory and error, per strategy and
# cp, against two baselines measured in the same run: single-process SDPA (cp=1) and `gather`, the strongest simple
# all-gather design (K and V gathered with one all_gather_into_tensor, local SDPA, dK/dV reduce-scattered).
# Every repeat is kept: times are the median and [min-max] over repeats of the slowest rank, ratios carry their
# range, and a target counts as met only when its whole range clears it.
#
#   python bench/attention.py --json bench/results/attention.json   # S=16384, B1 H8 D64 fp32, cp 1/2/4, 3 repeats
#   python bench/attention.py --report bench/results/attention.json # the table and targets of a saved run
#   python bench/attention.py --seq 4096 --cps 1,2 --repeats 3
#
# One thread per rank; ranks are real processes with a gloo group. Two passes over fresh processes per cp:
# - time: the slowest rank's (barrier before and after), glibc's default allocator (what a user gets);
# - memory, bytes and error: the rank's peak RSS during forward+backward minus its RSS with the inputs allocated
#   (the attention working set), with glibc told to mmap large blocks so that RSS follows live memory (that
#   setting makes every large allocation a fresh mmap and page faults, so it is not used for timing); error is
#   the max |out - reference| over 64 sampled query rows against float64.
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import MALLOC_ENV, fmt_ratio, ratio, reset_peak, rss_bytes, spread, verdict  # noqa: E402

from launch.spawn import spawn_ranks  # noqa: E402
from parallel.attention import context_parallel_attention  # noqa: E402
from parallel.comm import BYTES  # noqa: E402
from parallel.sequence import SequencePlan  # noqa: E402


class _GatherKV(torch.autograd.Function):
    """Baseline: K and V stacked and gathered with one all_gather_into_tensor; backward: the full dK/dV stacked and
    reduce-scattered (reduce_scatter_tensor), so each rank receives only its own shard's summed gradient. The
    strongest simple baseline: the minimum bytes of an all-gather design, two collectives per call."""

    @staticmethod
    def forward(ctx, kv, group):  # kv (2, B, H, N, D)
        world = dist.get_world_size(group)
        ctx.group = group
        parts = torch.empty((world * kv.shape[0], *kv.shape[1:]), dtype=kv.dtype)  # (cp * 2, B, H, N, D)
        dist.all_gather_into_tensor(parts, kv.contiguous(), group=group)
        parts = parts.view(world, *kv.shape)
        BYTES.sent += kv.numel() * kv.element_size() * (world - 1)  # ring all-gather: (p-1) shards per rank
        return torch.cat(list(parts), dim=3)  # (2, B, H, cp * N, D)

    @staticmethod
    def backward(ctx, g):  # g (2, B, H, cp * N, D)
        world = dist.get_world_size(ctx.group)
        shards = torch.cat(g.chunk(world, dim=3)).contiguous()  # (cp * 2, B, H, N, D): shard j at rows 2j, 2j+1
        out = torch.empty((2, *shards.shape[1:]), dtype=g.dtype)
        dist.reduce_scatter_tensor(out, shards, group=ctx.group)
        BYTES.sent += out.numel() * out.element_size() * (world - 1)  # ring reduce-scatter
        return out, None


def gather_attention(q, k, v, group):
    kv = _GatherKV.apply(torch.stack([k, v]), group)
    return F.scaled_dot_product_attention(q, kv[0], kv[1])


def analytic_bytes(strategy: str, cp: int, block: int, heads: int) -> int:
    """Minimum bytes a rank must send for forward+backward; `block` = bytes of one local K (= V, Q, out)."""
    if cp == 1:
        return 0
    if strategy == "ring":  # fwd: K/V to the next rank cp-1 times; bwd: K/V again + dK/dV accumulators
        return 3 * 2 * block * (cp - 1)
    if strategy == "allgather":  # fwd: own K/V to every other rank; bwd: dK/dV of every other rank's block
        return 2 * 2 * block * (cp - 1)
    if strategy == "ulysses":  # q,k,v in + out back; dout in + dq,dk,dv back: (cp-1)/cp of each
        return 8 * block * (cp - 1) // cp
    if strategy == "usp":  # ulysses over 2, ring over cp/2 on 1/2 of the heads with 2x the frames
        u, r = 2, cp // 2
        return 8 * block * (u - 1) // u + 3 * 2 * block * (r - 1)
    if strategy == "gather":  # like allgather: K/V of every other rank in, dK/dV of theirs out
        return 2 * 2 * block * (cp - 1)
    raise ValueError(strategy)


def _make_inputs(args, plan):
    gen = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.seq, args.dim)
    full = [torch.randn(shape, generator=gen) for _ in range(4)]  # q, k, v, dout
    local = [plan._take(t, 2).contiguous() for t in full]
    return full, local


def _run(fn, local, backward: bool):
    q, k, v, dout = local
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = fn(q, k, v)
    if backward:
        out.backward(dout)
    return out


def _strategy_fn(name: str, plan: SequencePlan, group):
    """`ring/1` is the ring with a single pass over all heads (head_chunks=1)."""
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "gather":
        return lambda q, k, v: gather_attention(q, k, v, group)
    strategy, _, chunks = name.partition("/")
    head_chunks = int(chunks) if chunks else None
    return lambda q, k, v: context_parallel_attention(q, k, v, plan, strategy=strategy, head_chunks=head_chunks)


def _worker(rank, world, args, strategies, result_file, phase):
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        ulysses = 2 if "usp" in strategies else 1
        mesh = init_device_mesh("cpu", (world // ulysses, ulysses), mesh_dim_names=("cp_ring", "cp_ulysses"))
    frames = args.frames
    plan = SequencePlan(frames, args.seq // frames, 0, mesh)
    full, local = _make_inputs(args, plan)
    q_full, k_full, v_full, _ = full
    del full
    gc.collect()
    group = plan.cp_group
    block = local[1].numel() * local[1].element_size()
    rows = []
    for strategy in strategies:
        fn = _strategy_fn(strategy, plan, group)
        _run(fn, local, True)  # warm-up
        times = {"fwd": [], "fwdbwd": []}
        for _ in range(args.repeats if phase == "time" else 0):
            for kind in ("fwd", "fwdbwd"):
                dist.barrier()
                t0 = time.perf_counter()
                with torch.set_grad_enabled(kind == "fwdbwd"):
                    _run(fn, local, kind == "fwdbwd")
                dist.barrier()
                times[kind].append(time.perf_counter() - t0)
        gc.collect()
        base = rss_bytes()
        reset_peak()
        BYTES.reset()
        out = _run(fn, local, True)
        peak = rss_bytes("VmHWM") - base
        sent = BYTES.sent
        # error on 64 sampled local query rows against float64 over the full K/V
        idx = torch.randperm(out.shape[2], generator=torch.Generator().manual_seed(rank))[:64]
        ids = plan.local_token_frame_ids() * plan.tokens_per_frame + torch.arange(out.shape[2]) % plan.tokens_per_frame
        qd = q_full[:, :, ids[idx]].double()
        ref = torch.softmax(qd @ k_full.double().transpose(-1, -2) * args.dim**-0.5, -1) @ v_full.double()
        err = (out.detach()[:, :, idx].double() - ref).abs().max().item()
        row = dict(
            strategy=strategy,
            cp=world,
            fwd=times["fwd"],
            fwdbwd=times["fwdbwd"],
            bytes=sent,
            analytic=analytic_bytes(strategy.partition("/")[0], world, block, args.heads) if strategy != "sdpa" else 0,
            mem=peak,
            err=err,
        )
        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        rows.append(
            dict(
                row,
                fwd=[max(ts) for ts in zip(*(r["fwd"] for r in gathered), strict=True)],  # slowest rank per repeat
                fwdbwd=[max(ts) for ts in zip(*(r["fwdbwd"] for r in gathered), strict=True)],
                mem=max(r["mem"] for r in gathered),
                err=max(r["err"] for r in gathered),
                bytes=max(r["bytes"] for r in gathered),
            )
        )
        del out
    if rank == 0:
        Path(result_file).write_text(json.dumps(rows))
    del mesh, plan, group


def _spawn(args, cp: int, strategies: list[str], phase: str) -> list[dict]:
    env = dict(MALLOC_ENV) if phase == "memory" else {}
    saved = {k: os.environ.pop(k, None) for k in MALLOC_ENV}
    os.environ.update(env)  # glibc reads these when the spawned ranks start
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "rows.json"
            spawn_ranks(_worker, cp, args, strategies, str(result), phase, directory=tmp)
            return json.loads(result.read_text())
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def run_cp(args, cp: int, strategies: list[str]) -> list[dict]:
    """Time rows from a default-allocator pass; memory, bytes and error from a pass with MALLOC_ENV."""
    timed = _spawn(args, cp, strategies, "time")
    measured = _spawn(args, cp, strategies, "memory")
    return [dict(m, fwd=t["fwd"], fwdbwd=t["fwdbwd"]) for t, m in zip(timed, measured, strict=True)]


def report(rows: list[dict], args) -> list[str]:
    """The markdown table and the target lines, from rows (as written to --json)."""
    base = next(r for r in rows if r["strategy"] == "sdpa")
    gather = {r["cp"]: r for r in rows if r["strategy"] == "gather"}
    out = [
        f"context-parallel attention: S={args['seq']} B=1 H={args['heads']} D={args['dim']} fp32, 1 thread/rank, "
        f"{args['cores']} cores, torch {args['torch']}, {args['repeats']} repeats (median [min-max])",
        "",
    ]
    head = (
        "| strategy | cp | fwd s | fwd+bwd s | speedup vs SDPA | vs gather | MiB sent/rank | vs analytic | "
        "working set MiB | vs cp=1 | max err |"
    )
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = "cpdit (cp=1)" if r["cp"] == 1 and r["strategy"] == "ring" else r["strategy"]
        vs_g = fmt_ratio(ratio(gather[r["cp"]]["fwdbwd"], r["fwdbwd"])) if r["cp"] in gather else "-"
        vs_an = f"{r['bytes'] / r['analytic']:.3f}" if r["analytic"] else "-"
        out.append(
            f"| {name} | {r['cp']} | {spread(r['fwd'])} | {spread(r['fwdbwd'])} | "
            f"{fmt_ratio(ratio(base['fwdbwd'], r['fwdbwd']))} | {vs_g} | {r['bytes'] / 2**20:.1f} | {vs_an} | "
            f"{r['mem'] / 2**20:.1f} | {r['mem'] / max(base['mem'], 1):.2f} | {r['err']:.1e} |"
        )
    find = {(r["strategy"], r["cp"]): r for r in rows}
    out.append("")
    bytes_ok = all(abs(r["bytes"] / r["analytic"] - 1) <= 0.02 for r in rows if r["analytic"])
    out.append(f"- bytes within 2% of the analytic minimum, every strategy: {'met' if bytes_ok else 'not met'}")
    if ("ring", 1) in find:
        r = ratio(base["fwdbwd"], find["ring", 1]["fwdbwd"])
        out.append(f"- cp=1 entry point within 3% of SDPA (ratio >= 0.97): {fmt_ratio(r)}: {verdict(r, 0.97)}")
    if ("ring", 2) in find:
        r = ratio(base["fwdbwd"], find["ring", 2]["fwdbwd"])
        out.append(f"- ring fwd+bwd at cp=2 >= 1.9x SDPA: {fmt_ratio(r)}: {verdict(r, 1.9)}")
    for cp in sorted(gather):
        if ("ring", cp) in find:
            r = ratio(gather[cp]["fwdbwd"], find["ring", cp]["fwdbwd"])
            out.append(f"- ring fwd+bwd at cp={cp} >= the gather baseline (1.0x): {fmt_ratio(r)}: {verdict(r, 1.0)}")
    if ("ring", 4) in find:
        share = find["ring", 4]["mem"] / max(base["mem"], 1)
        out.append(f"- ring working set at cp=4 <= 0.30x cp=1: {share:.2f}x: {'met' if share <= 0.30 else 'not met'}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Benchmark context-parallel attention strategies.")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--frames", type=int, default=16, help="frames the sequence is made of (S = frames x tpf)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cps", default="1,2,4")
    p.add_argument(
        "--strategies",
        default="ring,ring/4,ulysses,usp,allgather,gather",
        help="ring/N = ring in N passes over chunks of heads (head_chunks=N; `ring` is the default, 8)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the raw rows (every repeat) and the run's settings here")
    p.add_argument("--report", default=None, help="print the table of a --json file instead of measuring")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print("\n".join(report(saved["rows"], saved["settings"])))
        return
    rows: list[dict] = []
    for cp in (int(c) for c in args.cps.split(",")):
        if cp == 1:
            strategies = ["sdpa", "ring"]  # "ring" at cp=1 is cpdit's entry point falling through to local SDPA
        else:
            strategies = [s for s in args.strategies.split(",") if s != "usp" or cp >= 4]
        rows += run_cp(args, cp, strategies)
    settings = dict(
        seq=args.seq,
        heads=args.heads,
        dim=args.dim,
        frames=args.frames,
        repeats=args.repeats,
        cores=os.cpu_count(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    print("\n" + "\n".join(report(rows, settings)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
