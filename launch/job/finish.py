# The final steps of a training run, after its last checkpoint is on disk: the loss plot, the sample videos and the
# export. Each reports its own error and the others still run.
from __future__ import annotations

import sys

import torch.distributed as dist

from launch.job.metrics import plot_loss
from launch.job.sample import CollectiveFailed
from parallel.comm import agree


def finish(run) -> int:
    """Collective. Returns how many of the final steps failed on any rank (the same number on every rank)."""
    cfg, env, step = run.cfg, run.env, run.cfg.train.steps
    errors: list[str] = []

    def attempt(what: str, fn) -> None:
        try:
            errors.extend(f"{what}: {e}" for e in fn() or [])
        except CollectiveFailed:  # peers wait inside a collective for this rank: the job ends here
            raise
        except Exception as err:  # noqa: BLE001 - reported, and the next step still runs
            errors.append(f"{what}: {type(err).__name__}: {err}")

    if env.rank == 0:
        attempt("loss plot", lambda: plot_loss(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png"))
    if cfg.sample.at_end:
        from launch.job.sample import sample_videos
        from launch.job.validation import record

        def samples() -> list[str]:
            out = run.run_dir / "samples"
            _, write_errors = sample_videos(cfg, run.modules, run.parallel, run.ema, out, env)
            dist.barrier()  # every replica's videos are on disk: rank 0 logs them all, captioned with their prompt
            if env.rank == 0:  # and, on synthetic data, the judge's score as the validation curve's last point
                record(run, step, out)
            return write_errors

        attempt("samples", samples)
    if cfg.train.export:
        from launch.job.export import export_model

        lora = cfg.model.lora_rank > 0
        attempt("export", lambda: export_model(run.modules.dit, run.ema, run.run_dir / "export", env.rank, lora))
    for e in errors:
        print(f"cpdit [rank {env.rank}]: ERROR in {e}", file=sys.stderr, flush=True)
    failed = [any(e.startswith(k) for e in errors) for k in ("loss plot", "samples", "export")]
    return sum(agree(failed, "max", "final steps failed"))
