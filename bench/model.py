# Benchmark of the parallelized CogVideoXDiT: forward+backward time per step, tokens/s, per-rank peak and parameter
# memory, FLOPs and MFU, for several (cp, tp) layouts (dp = 1, so every layout computes the same step).
#
#   python bench/model.py                        # tiny and mid configs, layouts up to 4 ranks, fp32 on CPU
#   python bench/model.py --peak-tflops 989      # report MFU against a peak (e.g. H100 bf16 dense)
#   python bench/model.py --compiled             # eager vs compiled blocks (train.compile), tp=1 layouts, repeats
#
# FLOPs per sample and block (S = L + T*h*w tokens, d = hidden, f = feed-forward width):
#   forward = 2*S*d*(3d) [q,k,v] + 2*S*d*d [out] + 2*2*S*d*f [ff] + 4*S^2*d [QK^T and PV]
#   training step = 3 x forward (backward ~ 2 x forward); MFU = step FLOPs / step time / (ranks x peak).
from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import MALLOC_ENV, reset_peak, rss_bytes  # noqa: E402

from cpdit import CogVideoXConfig, CogVideoXDiT  # noqa: E402
from launch.spawn import spawn_ranks  # noqa: E402
from parallel.all_traffic import count_all_traffic  # noqa: E402
from parallel.comm import BYTES  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402
from parallel.parallelize import materialize, parallelize  # noqa: E402

CONFIGS = {
    # name: (config overrides, frames, latent H, latent W, text tokens)
    "tiny": (dict(), 13, 8, 8, 16),
    "mid": (
        dict(num_attention_heads=12, attention_head_dim=64, num_layers=4, time_embed_dim=256, text_embed_dim=256),
        13,
        16,
        16,
        226,
    ),
}


def step_flops(cfg: CogVideoXConfig, tokens: int, batch: int) -> float:
    d, f = cfg.hidden_size, cfg.ff_hidden
    per_block = 2 * tokens * d * 3 * d + 2 * tokens * d * d + 4 * tokens * d * f + 4 * tokens * tokens * d
    return 3.0 * batch * cfg.num_layers * per_block


def _worker(rank, world, name, cp, tp, steps, result, compiled=False, after_warmup=False):
    overrides, T, H, W, L = CONFIGS[name]
    cfg = CogVideoXConfig.preset("tiny", **overrides)
    dims = ParallelDims(world, cp_size=cp, model_parallel_size=tp)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = CogVideoXDiT(cfg)
    parallelize(model, dims, mesh, compile=compiled)
    materialize(model, "cpu", seed=0)
    with torch.no_grad():  # non-zero adaLN/output weights so every block really computes
        for p in model.parameters():
            p.add_(0.01)
    gen = torch.Generator().manual_seed(0)
    x, txt = (
        torch.randn(1, T, cfg.in_channels, H, W, generator=gen),
        torch.randn(1, L, cfg.text_embed_dim, generator=gen),
    )
    t = torch.tensor([500.0])
    param_bytes = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    times = []
    gc.collect()
    base = rss_bytes()
    reset_peak()
    for i in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        model(x, txt, t, return_local=True).square().mean().backward()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        if i == 0 and after_warmup:  # --compiled: both from after the warm-up (the compiler's memory is not the step's)
            gc.collect()
            base = rss_bytes()
            reset_peak()
    peak = rss_bytes("VmHWM") - base
    BYTES.reset()
    with count_all_traffic():  # one more step, counting every collective (attention, TP, FSDP)
        model(x, txt, t, return_local=True).square().mean().backward()
    sent = BYTES.sent
    row = dict(
        config=name,
        cp=cp,
        tp=tp,
        world=world,
        step=statistics.median(times[1:]),
        peak=peak,
        params=param_bytes,
        sent=sent,
        tokens=L + T * (H // 2) * (W // 2),
        flops=step_flops(cfg, L + T * (H // 2) * (W // 2), 1),
    )
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(result).write_text(
            json.dumps(
                dict(
                    row,
                    step=max(r["step"] for r in rows),
                    peak=max(r["peak"] for r in rows),
                    params=max(r["params"] for r in rows),
                    sent=max(r["sent"] for r in rows),
                )
            )
        )
    del model, mesh


def run(name: str, cp: int, tp: int, steps: int, compiled: bool = False, after_warmup: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # each compiled run compiles anew
        args = (name, cp, tp, steps, str(result), compiled, after_warmup)
        spawn_ranks(_worker, cp * tp, *args, directory=tmp, timeout=1800)
        return json.loads(result.read_text())


def compare_compiled(name: str, layouts: list[tuple[int, int]], steps: int, repeats: int) -> list[dict]:
    """Eager and compiled blocks in alternation, `repeats` times per layout: median [min-max] of each one's step
    time and peak (both measured after a warm-up step, the compiled one's compile excluded)."""
    rows = []
    for cp, tp in layouts:
        runs = {False: [], True: []}
        for _ in range(repeats):
            for compiled in (False, True):
                runs[compiled].append(run(name, cp, tp, steps, compiled, after_warmup=True))
        rows.append(dict(config=name, cp=cp, tp=tp, eager=runs[False], compiled=runs[True]))
    return rows


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def print_compiled(rows: list[dict]) -> None:
    print(f"\nCogVideoXDiT training step (fwd+bwd), fp32, eager vs compiled blocks, torch {torch.__version__}")
    print("| config | cp | tp | eager step s | compiled step s | speedup | eager peak MiB | compiled peak MiB |")
    print("|" + "---|" * 8)
    for r in rows:
        e, c = [x["step"] for x in r["eager"]], [x["step"] for x in r["compiled"]]
        ratios = [a / b for a in e for b in c]
        print(
            f"| {r['config']} | {r['cp']} | {r['tp']} | {_spread(e, '.3f')} | {_spread(c, '.3f')} | "
            f"{statistics.median(e) / statistics.median(c):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] | "
            f"{_spread([x['peak'] / 2**20 for x in r['eager']], '.0f')} | "
            f"{_spread([x['peak'] / 2**20 for x in r['compiled']], '.0f')} |"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Benchmark the parallelized CogVideoXDiT training step.")
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--layouts", default="1x1,2x1,1x2,4x1,2x2", help="cp x tp layouts (dp = 1)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-rank peak for MFU (omit on CPU)")
    p.add_argument("--json", default=None, help="write the raw rows (every quantity, the slowest rank's) here")
    p.add_argument("--compiled", action="store_true", help="eager vs compiled blocks instead (tp=1 layouts)")
    p.add_argument("--repeats", type=int, default=3, help="--compiled: runs of each, alternating")
    args = p.parse_args(argv)
    for key, value in MALLOC_ENV.items():  # RSS follows live memory (bench/common.py)
        os.environ.setdefault(key, value)
    if args.compiled:  # torch.compile with tp > 1 is refused by the job (launch/config.py)
        layouts = [tuple(int(v) for v in x.split("x")) for x in args.layouts.split(",")]
        rows = compare_compiled(
            args.configs.split(",")[-1], [(c, t) for c, t in layouts if t == 1], args.steps, args.repeats
        )
        print_compiled(rows)
        if args.json:
            raw = dict(measured=time.strftime("%Y-%m-%d"), torch=torch.__version__, args=vars(args), rows=rows)
            Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")
        return
    rows = []
    for name in args.configs.split(","):
        for layout in args.layouts.split(","):
            cp, tp = (int(v) for v in layout.split("x"))
            if CogVideoXConfig.preset("tiny", **CONFIGS[name][0]).num_attention_heads % tp:
                continue
            rows.append(run(name, cp, tp, args.steps))
    cores = os.cpu_count()
    print(f"\nCogVideoXDiT training step (fwd+bwd), fp32, 1 thread/rank, {cores} cores, torch {torch.__version__}")
    print(
        "| config | cp | tp | ranks | tokens | step s | speedup | tokens/s | GFLOP/step | GFLOP/s/rank | MFU | "
        "peak MiB/rank | params MiB/rank | MiB sent/rank (all traffic) |"
    )
    print("|" + "---|" * 14)
    base = {}
    for r in rows:
        base.setdefault(r["config"], r["step"])
        mfu = f"{r['flops'] / r['step'] / r['world'] / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "n/a"
        print(
            f"| {r['config']} | {r['cp']} | {r['tp']} | {r['world']} | {r['tokens']} | {r['step']:.3f} | "
            f"{base[r['config']] / r['step']:.2f}x | {r['tokens'] / r['step']:.0f} | {r['flops'] / 1e9:.1f} | "
            f"{r['flops'] / r['step'] / r['world'] / 1e9:.1f} | {mfu} | {r['peak'] / 2**20:.0f} | "
            f"{r['params'] / 2**20:.1f} | {r['sent'] / 2**20:.2f} |"
        )
    if args.json:
        raw = dict(measured=time.strftime("%Y-%m-%d"), torch=torch.__version__, cores=cores, args=vars(args), rows=rows)
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
