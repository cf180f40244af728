# Working set and time of one biased attention call (the Phenaki family's: ALiBi + a continuous-position-bias table
# over (t, h, w), null keys/values), forward + backward with the table's gradient, for the bias built per whole key
# block (bias_rows=0, the path before bounded blocks) against blocks of query rows (the default bound, and smaller).
# One process (cp=1: the same per-block code every cp strategy runs), fresh for each setting, glibc told to mmap
# large blocks so that peak RSS follows live memory.
#
#   python bench/bias.py --json bench/results/bias.json         # 8 frames of 16x16 tokens, 8 heads x 64, fp32
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from common import reset_peak, rss_bytes

    from cpdit.attn_bias import AttentionBias, ContinuousPositionBias, alibi_slopes, alibi_table
    from parallel.attention import context_parallel_attention, default_bias_rows
    from parallel.sequence import SequencePlan

    torch.set_num_threads(1)
    T, side, H, D = args.frames, args.side, args.heads, args.dim
    grid = (T, side, side)
    plan = SequencePlan(T, side * side, 0, None)
    gen = torch.Generator().manual_seed(0)
    S = T * side * side
    q, k, v, g = (torch.randn(1, H, S, D, generator=gen) for _ in range(4))
    torch.manual_seed(0)
    cpb = ContinuousPositionBias(32, H)
    null = torch.randn(2, H, 2, D, generator=gen).requires_grad_()
    slopes = torch.tensor(alibi_slopes(H))
    rows = {"whole": 0, "default": None}[args.rows] if args.rows in ("whole", "default") else int(args.rows)
    chosen = default_bias_rows(plan, H, 2) if rows is None else rows

    def step():
        table = cpb(grid, torch.float32, torch.device("cpu")) + alibi_table(slopes, T)
        bias = AttentionBias(grid, table, null, None, None, slopes)
        qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
        out = context_parallel_attention(qi, ki, vi, plan, causal=args.causal, bias=bias, bias_rows=rows)
        out.backward(g)
        return out

    step()  # warm-up
    base = rss_bytes()
    reset_peak()
    step()
    peak = rss_bytes("VmHWM") - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(setting=args.rows, rows=chosen, working_set=peak, times=times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Working set of a biased attention call: whole blocks vs row blocks.")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", default="whole,default,256")
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)  # internal: one setting in a fresh process
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rows is not None:
        print(json.dumps(measure(args)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from common import MALLOC_ENV, fmt_ratio, ratio, spread

    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    rows = []
    for setting in args.settings.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--rows",
            setting,
            "--frames",
            str(args.frames),
            "--side",
            str(args.side),
            "--heads",
            str(args.heads),
            "--dim",
            str(args.dim),
            "--repeats",
            str(args.repeats),
            "--causal" if args.causal else "--no-causal",
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    S = args.frames * args.side * args.side
    print(
        f"biased attention, 1 process: S={S} ({args.frames} frames of {args.side}x{args.side}) H={args.heads} "
        f"D={args.dim} fp32, causal={args.causal}, ALiBi + position table + 2 null kv, fwd+bwd, {args.repeats} "
        "repeats (median [min-max])\n"
    )
    print("| bias blocks | query-row bound | fwd+bwd s | time vs whole | working set MiB | vs whole |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        slower = fmt_ratio(ratio(r["times"], base["times"]))
        print(
            f"| {r['setting']} | {r['rows'] or S} | {spread(r['times'])} | {slower} | "
            f"{r['working_set'] / 2**20:.0f} | {r['working_set'] / base['working_set']:.2f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
