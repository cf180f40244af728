# Benchmark of the factorized (SVD-style) family under context parallelism: one layer = a spatial block + a
# temporal block (cpdit/factorized.py), frames split over cp ranks (real gloo processes), forward + backward.
# The temporal block's cross-frame attention runs three ways at the same shapes:
#   axis     switch the sharded axis frames -> spatial tokens with one all-to-all, attend locally, switch back
#            (parallel/axis_switch.py; what FactorizedDiT does under cp)
#   ring     keep the frames sharded and run ring attention over the frame axis (every spatial position a sequence)
#   ulysses  keep the frames sharded and run Ulysses (all-to-all heads <-> frames) over the frame axis
# Bytes are counted where the collectives are issued (parallel/comm.py), per rank, for one forward + backward, and
# compared with the analytic figures for equal splits (N = B*T*S tokens, D = width, e = bytes per element):
#   axis 4 (cp-1)/cp * N/cp * D * e   (two switches forward, two backward)
#   ulysses 8 (cp-1)/cp * N/cp * D * e (q, k, v in and the output back, forward and backward)
#   ring 6 (cp-1) * N/cp * D * e      (K/V around the ring forward; K/V again and dK/dV back in the backward)
# so axis/ulysses = 1/2 and axis/ring = 2/(3 cp) per temporal block (and 1/(2k), 2/(3 cp k) with k = temporal_blocks
# temporal blocks per switch). Every output is checked against cp=1 before timing is reported.
#
#   python bench/families.py                       # T=16 frames of 16x16 tokens, width 128, cp 1/2/4
#   python bench/families.py --frames 8 --side 8 --repeats 3
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpdit.factorized import Attention, FactorizedConfig, SpatialBlock, TemporalBlock  # noqa: E402
from parallel.attention import context_parallel_attention  # noqa: E402
from parallel.axis_switch import AxisSwitch  # noqa: E402
from parallel.comm import BYTES  # noqa: E402
from parallel.sequence import SequencePlan, frame_partition  # noqa: E402

MODES = ("axis", "ring", "ulysses")


class FrameParallelAttention(Attention):
    """Self-attention across the frames of each spatial position with the frames sharded over cp (bench only)."""

    plan: SequencePlan
    strategy: str

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        N, Tr, _ = x.shape  # (B * S, T_r, D)
        q, k, v = (t.reshape(N, Tr, -1, self.head_dim).transpose(1, 2) for t in
                   (self.to_q(x), self.to_k(x), self.to_v(x)))  # fmt: skip
        out = context_parallel_attention(q, k, v, self.plan, strategy=self.strategy)
        return self.to_out(out.transpose(1, 2).reshape(N, Tr, -1))


def _layer(cfg: FactorizedConfig, depth: int):
    torch.manual_seed(0)
    return SpatialBlock(cfg), torch.nn.ModuleList(TemporalBlock(cfg) for _ in range(depth))


def _run(mode, spatial, temporal, x, switch):
    B, Tr, S, D = x.shape
    h = spatial(x.reshape(B * Tr, S, D), None).reshape(B, Tr, S, D)
    if mode == "axis":
        m = switch.frames_to_tokens(h)  # (B, T, S_r, D)
        T, Sr = m.shape[1], m.shape[2]
        m = m.transpose(1, 2).reshape(B * Sr, T, D)
        for block in temporal:
            m = block(m, None)
        return switch.tokens_to_frames(m.reshape(B, Sr, T, D).transpose(1, 2))
    m = h.transpose(1, 2).reshape(B * S, Tr, D)
    for block in temporal:
        m = block(m, None)
    return m.reshape(B, S, Tr, D).transpose(1, 2)


def _worker(rank, world, init_file, mode, args, result):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=3600)
    )
    cfg = FactorizedConfig(
        in_channels=args.width,
        num_heads=args.heads,
        head_dim=args.width // args.heads,
        context_dim=None,
        temporal_blocks=args.temporal_blocks,
        ff_in=False,
        disable_temporal_crossattention=True,
    )  # one cross-frame attention per temporal block
    spatial, temporal = _layer(cfg, args.temporal_blocks)
    T, S = args.frames, args.side * args.side
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, S, args.width, generator=gen)
    segs = frame_partition(T, world)
    frames = [[f for a, b in s for f in range(a, b)] for s in segs]
    mine = torch.tensor(frames[rank])
    switch = AxisSwitch(frames, S, dist.group.WORLD if world > 1 else None)
    mesh = None
    if mode != "axis" and world > 1:
        shape = (world, 1) if mode == "ring" else (1, world)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("cp_ring", "cp_ulysses"))
        plan = SequencePlan(T, 1, 0, mesh)
        for block in temporal:
            block.attn1.__class__ = FrameParallelAttention
            block.attn1.plan, block.attn1.strategy = plan, mode
    x_local = x.index_select(1, mine).clone().requires_grad_()

    def step():
        out = _run(mode, spatial, temporal, x_local, switch)
        out.square().mean().backward()
        return out.detach()

    out = step()  # warm-up, and the output for the parity check
    BYTES.reset()
    step()
    sent = BYTES.sent
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    parts = [torch.zeros(1, len(frames[r]), S, args.width) for r in range(world)]
    dist.all_gather(parts, out) if world > 1 else parts.__setitem__(0, out)
    full = torch.cat(parts, dim=1).index_select(1, torch.tensor([f for fr in frames for f in fr]).argsort())
    if rank == 0:
        torch.save(full, Path(result).with_suffix(".pt"))
        Path(result).write_text(json.dumps({"s": t.item(), "bytes": sent}))
    del mesh
    dist.destroy_process_group()
    gc.collect()


def measure(mode: str, world: int, args) -> tuple[dict, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "rdzv"), mode, args, result), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return json.loads(Path(result).read_text()), torch.load(Path(result).with_suffix(".pt"), weights_only=True)


def analytic(mode: str, cp: int, args) -> float:
    n_local = args.frames * args.side * args.side / cp
    per = n_local * args.width * 4  # fp32 bytes of one rank's (N/cp, D) activation
    k = args.temporal_blocks
    if mode == "axis":
        return 4 * (cp - 1) / cp * per
    if mode == "ulysses":
        return 8 * (cp - 1) / cp * per * k
    return 6 * (cp - 1) * per * k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--side", type=int, default=16, help="spatial tokens per side (S = side^2)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--temporal-blocks", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    base, ref = measure("axis", 1, args)
    shape = f"B=1 T={args.frames} S={args.side}x{args.side} D={args.width} H={args.heads}"
    layer = f"one factorized layer (spatial + {args.temporal_blocks} temporal block(s))"
    print(f"{layer}, {shape}, fp32, forward+backward; cp=1: {base['s']:.3f} s")
    print()
    print(
        "| mode | cp | fwd+bwd s | speedup vs cp=1 | MiB sent/rank | analytic MiB | measured/analytic | "
        "bytes vs axis | max abs diff vs cp=1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cp in (2, 4):
        rows = {}
        for mode in MODES:
            r, out = measure(mode, cp, args)
            rows[mode] = (r, (out - ref).abs().max().item())
        for mode in MODES:
            r, err = rows[mode]
            a = analytic(mode, cp, args)
            vs_axis = r["bytes"] / rows["axis"][0]["bytes"]
            print(f"| {mode} | {cp} | {r['s']:.3f} | {base['s'] / r['s']:.2f}x | {r['bytes'] / 2**20:.2f} | "
                  f"{a / 2**20:.2f} | {r['bytes'] / a:.3f} | {vs_axis:.2f}x | {err:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
