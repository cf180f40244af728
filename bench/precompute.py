# What precomputing latents buys: `cpdit-launch precompute` of a synthetic dataset through the VAE, then the same
# training run on the fly (VAE encode in every step) and from the precomputed directory, alternated in repeats.
#
#   python bench/precompute.py [--repeats 3] [--steps 12] [--clips 32]
#
# Prints the table and writes bench/results/precompute.json. Each run is a real cpdit-launch job on 2 processes
# (cp=2: the VAE and the DiT split over both); step times are the medians of each run's steps after the first two.
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The VAE and clip size make the first stage a real share of the step, as at CogVideoX shapes (Open-Sora's configs
# show online VAE encoding at 34-39% of a step); the tiny DiT keeps the run short on 2 CPU cores.
JOB = [
    "first_stage.kind=vae",
    "first_stage.preset=tiny",
    "data.num_frames=17",
    "data.height=64",
    "data.width=64",
    "data.batch_size=2",
    "model.preset=tiny",
    "logging.wandb=false",
    "train.export=false",
    "sample.at_end=false",
    "checkpoint.every=0",
    "dist.watchdog=false",
]
LAYOUT = ["--nproc-per-node", "2", "--cp-size", "2", "--model-parallel-size", "1"]


def launch(command: str, *overrides: str, cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "launch", *LAYOUT, command, *JOB, *overrides]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.monotonic() - t0


def steps_of(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if "loss" in r and "event" not in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--clips", type=int, default=32)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cpdit-precompute-bench-"))
    data = [f"data.num_samples={args.clips}", f"train.output_dir={work}"]
    pre = work / "precomputed"
    wall = launch("precompute", *data, f"precompute.output_dir={pre}", "precompute.shard_size=8", cwd=work)
    index = json.loads((pre / "index.json").read_text())
    size = sum(p.stat().st_size for p in pre.glob("shard-*.safetensors"))
    rows = {"on the fly": [], "precomputed": []}
    for rep in range(args.repeats):
        for mode in rows:
            extra = ["data.dataset=precomputed", f"data.path={pre}"] if mode == "precomputed" else []
            run = f"{mode.replace(' ', '_')}-{rep}"
            launch("train", *data, f"train.steps={args.steps}", f"train.run_name={run}", *extra, cwd=work)
            steps = steps_of(work / run)[2:]
            rows[mode].append(
                {
                    "median_step_s": statistics.median(r["step_time"] for r in steps),
                    "losses": [r["loss"] for r in steps_of(work / run)],
                    "mem_mb": max(r["mem_mb"] for r in steps),
                }
            )
    same = all(close(a["losses"], b["losses"]) for a, b in zip(rows["on the fly"], rows["precomputed"], strict=True))
    base = statistics.median(r["median_step_s"] for r in rows["on the fly"])
    result = {
        "measured": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, 2 processes (cp=2), gloo",
        "job": JOB,
        "clips": args.clips,
        "precompute": {
            "wall_s": round(wall, 2),
            "encode_s": index["seconds"],
            "s_per_clip": round(index["seconds"] / args.clips, 4),
            "bytes": size,
        },
        "losses_equal_rel_1e-6": same,
        "modes": {},
    }
    print(
        f"precompute: {args.clips} clips in {index['seconds']:.2f} s of encoding ({index['seconds'] / args.clips:.3f} "
        f"s/clip; {wall:.1f} s wall with start-up), {size / 2**20:.1f} MiB on disk\n"
    )
    print("| training | median step (s) | spread over repeats (s) | vs on the fly | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for mode, reps in rows.items():
        t = [r["median_step_s"] for r in reps]
        med = statistics.median(t)
        result["modes"][mode] = {"median_step_s": round(med, 4), "repeats_s": [round(x, 4) for x in t]}
        result["modes"][mode]["mem_mb"] = round(statistics.median(r["mem_mb"] for r in reps), 1)
        print(
            f"| {mode} | {med:.3f} | {min(t):.3f}-{max(t):.3f} | {med / base:.2f}x | "
            f"{result['modes'][mode]['mem_mb']:.0f} |"
        )
    print(f"\nlosses of every step equal (rel 1e-6) on the fly and precomputed: {same}")
    dest = ROOT / "bench" / "results" / "precompute.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {dest.relative_to(ROOT)}")
    shutil.rmtree(work)
    return 0


def close(a: list[float], b: list[float], rel: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    sys.exit(main())
