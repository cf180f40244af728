# The default job's numbers that README.md and bench/README.md quote, produced the way a user meets them:
#
#   python bench/default_job.py            # from the repository root; runs/default must not exist yet
#   python bench/default_job.py --variant bf16 train.mixed_precision=bf16   # the same command with overrides:
#                                          # runs/default-bf16, results/default_job-bf16.json, no README picture
#
# 1. the README's first command, as written (read out of README.md, as .ci/run reads it), timed;
# 2. the judge (bench/judge.py) on the 4 samples that job wrote;
# 3. `cpdit-launch sample sample.prompts_file=FILE` with 8 other prompts of the vocabulary, from the job's final
#    checkpoint, and the judge on those.
# Prints the tables, writes every number, with each clip's verdict, to bench/results/default_job.json, and stacks the
# default prompts' frame grids into docs/default-job-samples.png (the README's picture).
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from judge import print_table, read_frames, score  # noqa: E402

RUN = ROOT / "runs" / "default"
OTHER_PROMPTS = [
    "a purple square moving left",
    "a white triangle moving up",
    "a green triangle moving down",
    "a blue circle moving right",
    "a red square moving up",
    "a yellow circle moving down",
    "a white square moving right",
    "a purple circle moving left",
]


def readme_command() -> str:
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("(python -c 'import torch'")]
    if not lines or not lines[0].endswith("cpdit-launch train"):
        raise SystemExit("README.md's first set-up command (the torch guard ... cpdit-launch train) is not found")
    return lines[0]


def judged(gifs: list[Path], prompt_of) -> tuple[list[dict], dict]:
    rows = score([(prompt_of(g), read_frames(g)) for g in gifs])
    print_table(rows)
    summary = {
        "clips": len(rows),
        "right_in_every_attribute": sum(r["score"] == 1.0 for r in rows),
        "mean_score": round(sum(r["score"] for r in rows) / max(len(rows), 1), 4),
    }
    clips = [{"prompt": r["prompt"], "score": r["score"], "ok": r["ok"], "seen": {**vars(r["verdict"])}} for r in rows]
    return clips, summary


def figure(samples: Path, dest: Path) -> None:
    """The default prompts' frame-grid PNGs (one row each, frames left to right), top to bottom."""
    import imageio.v2 as imageio
    import numpy as np

    rows = [imageio.imread(p)[..., :3] for p in sorted(samples.glob("*.png"))]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]  # 4 black rows between prompts
    imageio.imwrite(dest, np.concatenate(rows)[:-4])


def prompt_from_stem(gif: Path) -> str:
    return re.sub(r"^\d+_", "", gif.stem).replace("_", " ")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run the README's default job and judge its samples.")
    ap.add_argument("--variant", default=None, help="a name for a run with overrides (runs/default-NAME)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides appended to the README's command")
    args = ap.parse_args(argv)
    if args.overrides and not args.variant:
        ap.error("overrides need --variant NAME (the README's own numbers come from the command as written)")
    run = RUN.with_name(f"default-{args.variant}") if args.variant else RUN
    if run.exists():
        raise SystemExit(f"{run} exists: move it away first (this script measures a fresh run of the default job)")
    cmd = readme_command()
    if args.variant:
        cmd = " ".join([cmd, f"train.run_name={run.name}", *args.overrides])
    print(f"$ {cmd}", flush=True)
    t0 = time.monotonic()
    subprocess.run(["bash", "-c", cmd], cwd=ROOT, check=True)
    wall = time.monotonic() - t0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    result = {
        "command": cmd,
        "overrides": args.overrides,
        "measured": time.strftime("%Y-%m-%d"),
        "wall_s": round(wall, 1),
        "steps": len(steps),
        "median_step_s": round(statistics.median(r["step_time"] for r in steps), 4),
        "final_loss": round(steps[-1]["loss"], 4),
        "mean_loss_last_50": round(statistics.fmean(r["loss"] for r in steps[-50:]), 4),
        # sample.every=N: the judge's score of the validation samples at each N steps (launch/job/validation.py)
        "validation_curve": [
            {k: r[k] for k in ("step", "judge_score", "judge_all_right", "judged")}
            for r in rows
            if r.get("event") == "validation"
        ],
    }
    print(
        f"\n{result['steps']} steps in {wall:.0f} s wall, median step {result['median_step_s']} s, "
        f"final loss {result['final_loss']}\n\n## default prompts\n"
    )
    result["default_prompts"], result["default_summary"] = judged(sorted(run.glob("samples/*.gif")), prompt_from_stem)
    if not args.variant:
        figure(run / "samples", ROOT / "docs" / "default-job-samples.png")
    prompts = run / "other_prompts.txt"
    prompts.write_text("\n".join(OTHER_PROMPTS) + "\n")
    sample = [sys.executable, "-m", "launch", "sample", f"sample.prompts_file={prompts}"]
    if args.variant:
        sample += [f"train.run_name={run.name}", *args.overrides]
    print(f"\n$ {' '.join(sample)}", flush=True)
    subprocess.run(sample, cwd=ROOT, check=True)
    out = max(p for p in (run / "samples").glob("step_*") if p.is_dir())
    print("\n## eight other prompts\n")
    result["other_prompts"], result["other_summary"] = judged(sorted(out.glob("*.gif")), prompt_from_stem)
    dest = ROOT / "bench" / "results" / (f"default_job-{args.variant}.json" if args.variant else "default_job.json")
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {dest.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
