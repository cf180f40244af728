# The image-to-video demo job's numbers that README.md and bench/README.md quote:
#
#   python bench/i2v_demo.py                 # from the repository root; runs/i2v-demo must not exist yet
#   python bench/i2v_demo.py --write-images  # (re)writes configs/i2v-demo/: the 8 held-out images and prompts.txt
#
# 1. `cpdit-launch train configs/i2v-demo.yaml` (4 processes, cp=2 x tp=2), timed: it trains on
#    data.dataset=synthetic_i2v (captions name only the motion) and samples, at the end, the 8 held-out images of
#    configs/i2v-demo/prompts.txt;
# 2. the judge's image-to-video mode (bench/judge.py --i2v) on those 8 samples.
# Prints the table, writes every number, with each clip's verdict, to bench/results/i2v_demo.json, and stacks each
# sample's frame grid under its image into docs/i2v-demo-samples.png (the README's picture).
#
# Held out: the images are first frames of SyntheticShapesI2V under HELD_OUT_SEED, a seed no job trains on (the
# training clips come from train.seed), two per direction; start positions are continuous, so no training clip
# begins with one of them.
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from judge import print_table, read_i2v_samples, score_i2v  # noqa: E402

from launch.job.data import MOTIONS, SyntheticShapesI2V  # noqa: E402

CONFIG = ROOT / "configs" / "i2v-demo.yaml"
IMAGES = ROOT / "configs" / "i2v-demo"
RUN = ROOT / "runs" / "i2v-demo"
HELD_OUT_SEED = 90210
PER_DIRECTION = 2


def held_out(size: int = 16, frames: int = 8) -> list[tuple[str, np.ndarray]]:
    """[(caption, first frame (H, W, 3) uint8)]: the first clips of the held-out seed, PER_DIRECTION per motion,
    in the order drawn."""
    ds = SyntheticShapesI2V(10_000, frames, size, size, HELD_OUT_SEED)
    out, count = [], dict.fromkeys(MOTIONS, 0)
    for i in range(len(ds)):
        motion = ds.describe(i)[2]
        if count[motion] == PER_DIRECTION:
            continue
        count[motion] += 1
        video, caption = ds[i]
        out.append((caption, np.round((video[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)))
        if len(out) == PER_DIRECTION * len(MOTIONS):
            return out
    raise AssertionError("unreachable: 10000 clips hold two of every direction")


def write_images(dest: Path = IMAGES) -> None:
    import imageio.v2 as imageio

    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (caption, image) in enumerate(held_out()):
        imageio.imwrite(dest / f"{k:02d}.png", image)
        lines.append(f"{k:02d}.png\t{caption}")
    (dest / "prompts.txt").write_text("\n".join(lines) + "\n")


def figure(items: list[tuple[str, np.ndarray, np.ndarray]], dest: Path, scale: int = 4) -> None:
    """One row per held-out image: the image, a gap, then the sample's frames, nearest-upscaled by `scale`."""
    import imageio.v2 as imageio

    rows = []
    for _, image, frames in items:
        s = frames.shape[1] // image.shape[0]  # the job writes samples nearest-upscaled; bring them to image size
        tiles = [image, np.zeros_like(image[:, :4])] + [np.pad(f[::s, ::s], ((0, 0), (0, 1), (0, 0))) for f in frames]
        row = np.concatenate(tiles, axis=1)
        rows.append(np.pad(row, ((0, 1), (0, 0), (0, 0))))
    grid = np.concatenate(rows)[:-1]
    imageio.imwrite(dest, np.repeat(np.repeat(grid, scale, 0), scale, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the image-to-video demo job and judge its samples.")
    ap.add_argument("--write-images", action="store_true", help="write configs/i2v-demo/ (held-out images) and stop")
    args = ap.parse_args()
    if args.write_images:
        write_images()
        print(f"wrote {IMAGES.relative_to(ROOT)}/")
        return 0
    if RUN.exists():
        raise SystemExit(f"{RUN} exists: move it away first (this script measures a fresh run of the demo)")
    cmd = [sys.executable, "-m", "launch", "train", str(CONFIG.relative_to(ROOT))]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.monotonic() - t0
    rows = [json.loads(ln) for ln in (RUN / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    result = {
        "command": " ".join(["cpdit-launch", *cmd[3:]]),
        "measured": time.strftime("%Y-%m-%d"),
        "wall_s": round(wall, 1),
        "steps": len(steps),
        "median_step_s": round(statistics.median(r["step_time"] for r in steps), 4),
        "final_loss": round(steps[-1]["loss"], 4),
        "mean_loss_last_50": round(statistics.fmean(r["loss"] for r in steps[-50:]), 4),
    }
    print(f"\n{result['steps']} steps in {wall:.0f} s wall (training and sampling), loss {result['final_loss']}\n")
    items = read_i2v_samples(IMAGES / "prompts.txt", RUN / "samples")
    judged = score_i2v(items)
    print_table(judged)
    result["clips"] = [
        {"prompt": r["prompt"], "score": r["score"], "ok": r["ok"], "seen": vars(r["verdict"])} for r in judged
    ]
    result["right_in_every_attribute"] = sum(r["score"] == 1.0 for r in judged)
    result["mean_score"] = round(statistics.fmean(r["score"] for r in judged), 4)
    figure(items, ROOT / "docs" / "i2v-demo-samples.png")
    dest = ROOT / "bench" / "results" / "i2v_demo.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {dest.relative_to(ROOT)} and docs/i2v-demo-samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
