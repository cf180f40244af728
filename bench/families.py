# Benchmark of the factorized (SVD-style) family under context parallelism: one layer = a spatial block + a temporal
# block (cpdit/models/factorized/layers.py), frames split over cp ranks (real gloo processes), forward + backward. The
# temporal block's cross-frame attention runs three ways at the same shapes:
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
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import fmt_ratio, ratio, spread, verdict  # noqa: E402

from cpdit.models.factorized.layers import Attention, FactorizedConfig, SpatialBlock, TemporalBlock  # noqa: E402
from launch.spawn import spawn_ranks  # noqa: E402
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
        q, k, v = (
            t.reshape(N, Tr, -1, self.head_dim).transpose(1, 2) for t in (self.to_q(x), self.to_k(x), self.to_v(x))
        )
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


def _worker(rank, world, mode, args, result):
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
    t = torch.tensor(times)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank, per repeat
    parts = [torch.zeros(1, len(frames[r]), S, args.width) for r in range(world)]
    dist.all_gather(parts, out) if world > 1 else parts.__setitem__(0, out)
    full = torch.cat(parts, dim=1).index_select(1, torch.tensor([f for fr in frames for f in fr]).argsort())
    if rank == 0:
        torch.save(full, Path(result).with_suffix(".pt"))
        Path(result).write_text(json.dumps({"s": t.tolist(), "bytes": sent}))
    del mesh


def measure(mode: str, world: int, args) -> tuple[dict, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        spawn_ranks(_worker, world, mode, args, result, directory=tmp)
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


def table(rows: list[dict], settings: dict) -> list[str]:
    """The markdown table of a run (rows as written to --json)."""
    base = next(r for r in rows if r["cp"] == 1)
    out = [
        f"one factorized layer (spatial + {settings['temporal_blocks']} temporal block(s)), B=1 T={settings['frames']} "
        f"S={settings['side']}x{settings['side']} D={settings['width']} H={settings['heads']}, fp32, forward+backward, "
        f"{settings['repeats']} repeats (median [min-max]); cp=1: {spread(base['s'])} s",
        "",
        "| mode | cp | fwd+bwd s | speedup vs cp=1 | MiB sent/rank | analytic MiB | measured/analytic | "
        "bytes vs axis | max abs diff vs cp=1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    axis = {r["cp"]: r for r in rows if r["mode"] == "axis"}
    for r in rows:
        if r["cp"] == 1:
            continue
        out.append(
            f"| {r['mode']} | {r['cp']} | {spread(r['s'])} | {fmt_ratio(ratio(base['s'], r['s']))} | "
            f"{r['bytes'] / 2**20:.2f} | {r['analytic'] / 2**20:.2f} | {r['bytes'] / r['analytic']:.3f} | "
            f"{r['bytes'] / axis[r['cp']]['bytes']:.2f}x | {r['err']:.1e} |"
        )
    out.append("")
    for cp in sorted(axis):
        others = [r for r in rows if r["cp"] == cp and r["mode"] != "axis"]
        for r in others:
            v = verdict(ratio(r["s"], axis[cp]["s"]), 1.0)
            out.append(
                f"- axis switching at least as fast as {r['mode']} at cp={cp}: "
                f"{fmt_ratio(ratio(r['s'], axis[cp]['s']))}: {v}"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--side", type=int, default=16, help="spatial tokens per side (S = side^2)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--temporal-blocks", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write every repeat and the settings here")
    ap.add_argument("--report", default=None, help="print the table of a --json file instead of measuring")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print("\n".join(table(saved["rows"], saved["settings"])))
        return
    base, ref = measure("axis", 1, args)
    rows = [dict(mode="axis", cp=1, s=base["s"], bytes=0, analytic=0, err=0.0)]
    for cp in (2, 4):
        for mode in MODES:
            r, out = measure(mode, cp, args)
            rows.append(
                dict(
                    mode=mode,
                    cp=cp,
                    s=r["s"],
                    bytes=r["bytes"],
                    analytic=analytic(mode, cp, args),
                    err=(out - ref).abs().max().item(),
                )
            )
    settings = dict(
        frames=args.frames,
        side=args.side,
        width=args.width,
        heads=args.heads,
        repeats=args.repeats,
        temporal_blocks=args.temporal_blocks,
        cores=os.cpu_count(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    print("\n".join(table(rows, settings)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
