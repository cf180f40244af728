# Validation while training (sample.every=N): every N steps the validation prompts (sample.prompts, sample.images, or
# sample.prompts_file) are sampled through the context-parallel model with the EMA weights into samples/step_N/,
# logged to wandb with their captions at their step, and, on the synthetic datasets, scored by the judge
# (launch/job/judge.py) into metrics.jsonl as a "validation" event, so the score is a curve over training. The final
# samples (sample.at_end) are scored the same way. A failure is reported and training goes on: sampling's own
# failures are agreed by every rank (launch/job/sample.py); a failure inside its collectives still ends the job.
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch.distributed as dist

from launch.job.precomputed import source_dataset
from launch.job.prompts import read_requests
from launch.job.sample import SamplingFailed, sample_videos, video_stem, written_videos
from parallel.progress import PROGRESS


def validation_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "samples" / f"step_{step:08d}"


def validate(run, step: int) -> None:
    """Collective: sample.every's samples of `step` (the EMA weights when kept); errors are printed, not raised."""
    cfg, rank = run.cfg, run.env.rank
    out = validation_dir(run.run_dir, step)
    PROGRESS.enter("validation")
    try:
        _, errors = sample_videos(cfg, run.modules, run.parallel, run.ema, out, run.env)
    except SamplingFailed as err:  # raised on every rank at the same point: all go on training
        errors = [f"{type(err).__name__}: {err}"]
    finally:
        run.modules.train()
    dist.barrier()  # every replica's videos are on disk
    if rank == 0:
        try:
            record(run, step, out)
        except Exception as err:  # noqa: BLE001 - a failed wandb upload or judge must not stop training
            errors.append(f"logging or judging: {type(err).__name__}: {err}")
    for e in errors:
        print(
            f"cpdit [rank {rank}]: validation at step {step} failed: {e}; training goes on", file=sys.stderr, flush=True
        )


def record(run, step: int, out: Path) -> None:
    """Rank 0: the samples under `out` to wandb at `step`, and the judge's scores to metrics.jsonl."""
    requests = read_requests(run.cfg)
    run.log.log_videos(step, written_videos(out, [r.prompt for r in requests]))
    scores = judged(source_dataset(run.cfg), requests, out)
    if scores is not None:
        run.log.event(event="validation", step=step, **scores)


def judged(dataset: str, requests: list, out: Path) -> dict | None:
    """The judge's mean score and the clips right in every attribute over the samples under `out` whose prompts the
    synthetic vocabulary covers; None for other data or when none is judged."""
    from launch.job.judge import parse_motion_prompt, parse_prompt, read_frames, score, score_i2v

    items = []
    for k, r in enumerate(requests):
        gif = out / f"{video_stem(k, r.prompt)}.gif"
        if not gif.is_file():
            continue
        if dataset == "synthetic" and parse_prompt(r.prompt):
            items.append((r.prompt, read_frames(gif)))
        elif dataset == "synthetic_i2v" and r.image and parse_motion_prompt(r.prompt):
            items.append((r.prompt, read_frames(Path(r.image))[0], read_frames(gif)))
    if not items:
        return None
    rows = score(items) if dataset == "synthetic" else score_i2v(items)
    return {
        "judge_score": round(statistics.fmean(r["score"] for r in rows), 4),
        "judge_all_right": sum(r["score"] == 1.0 for r in rows),
        "judged": len(rows),
    }
