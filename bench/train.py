# Benchmark of the default training job per parallel layout: steps/s, tokens/s and the share of each step spent
# loading data, from real `cpdit-launch train` runs (4 gloo processes, the default job's `demo` model, synthetic
# videos).
#
#   python bench/train.py                  # 25 steps per layout
#   python bench/train.py --steps 50 --layouts "cp2xtp2,cp4"
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {  # name: (cpdit-launch knob flags, config overrides), 4 processes
    "cp2xtp2": (["--cp-size", "2", "--model-parallel-size", "2"], []),
    "cp4-ring": (["--cp-size", "4", "--model-parallel-size", "1"], ["parallel.attention=ring"]),
    "cp4-ulysses": (["--cp-size", "4", "--model-parallel-size", "1", "--ulysses-size", "4"], []),
    "dp2xcp2": (["--cp-size", "2", "--model-parallel-size", "1"], []),
    "dp2xtp2": (["--cp-size", "1", "--model-parallel-size", "2"], []),
    "dp4": (["--cp-size", "1", "--model-parallel-size", "1"], []),
}


def run(name: str, steps: int, root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    flags, overrides = LAYOUTS[name]
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "--nproc-per-node",
        "4",
        *flags,
        "train",
        *overrides,
        f"train.steps={steps}",
        f"train.output_dir={root}",
        f"train.run_name={name}",
        "checkpoint.every=0",
        "sample.at_end=false",
        "train.export=false",
        "logging.wandb=false",
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "step_time" in row][3:]  # skip warm-up steps
    step = statistics.median(row["step_time"] for row in rows)
    return dict(
        layout=name,
        step=step,
        tokens_per_s=statistics.median(row["tokens_per_s"] for row in rows),
        data_share=statistics.median(row["data_time"] / row["step_time"] for row in rows),
        loss=rows[-1]["loss"],
        wall=wall,
        step_times=[row["step_time"] for row in rows],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Benchmark the training job per layout.")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--json", default=None, help="write the raw rows (and every step's time) here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, args.steps, Path(tmp)) for name in args.layouts.split(",")]
    base = rows[0]["step"]
    print(
        f"\ndefault job per layout (demo model, 8 frames 16x16, the default batch per replica, 4 processes, "
        f"{os.cpu_count()} cores), median over steps 4..{args.steps}"
    )
    print("| layout | step s | steps/s | vs first | tokens/s | data-loading share | loss at end | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['step']:.3f} | {1 / r['step']:.2f} | {base / r['step']:.2f}x | "
            f"{r['tokens_per_s']:.0f} | {r['data_share']:.1%} | {r['loss']:.3f} | {r['wall']:.0f} |"
        )
    if args.json:
        raw = dict(measured=time.strftime("%Y-%m-%d"), cores=os.cpu_count(), args=vars(args), rows=rows)
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
