# The training job behind `cpdit-launch train`: CogVideoX's v-prediction diffusion objective on a parallelized model
# of any registered family (dp x cp x tp, FSDP2), AdamW with warm-up + cosine, global-norm clipping, accumulation,
# EMA, NaN guard, DCP checkpoints with exact resume (also under another layout), a run directory with metrics, loss
# curve, wandb (offline) files, sample videos and a safetensors/diffusers export.
#
# The loop reads in one screen; its parts live beside it: start_run (run.py: build, resume, data), train_step
# (step.py: accumulate, reduce, clip, loss scale, NaN guard, optimizer, EMA; loss.py: the objective), TrainState
# (state.py: what a checkpoint's meta carries) and finish (finish.py: loss plot, samples, export).
from __future__ import annotations

import resource
import sys
from datetime import timedelta

import torch

from cpdit.seeding import derive_seed
from launch.config import JobConfig, to_yaml
from launch.distributed import distributed
from launch.env import DistEnv
from launch.job import checkpoint
from launch.job.finish import finish
from launch.job.preemption import EXIT_PREEMPTED, StopRequest, under_torchelastic, write_marker
from launch.job.run import Run, start_run
from launch.job.step import StepResult, train_step
from launch.job.validation import validate
from parallel.dims import ParallelDims
from parallel.progress import PROGRESS


def train(cfg: JobConfig, env: DistEnv) -> int:
    dims = ParallelDims.from_config(cfg.parallel, env.world_size)
    stop = StopRequest(env.rank).install()  # before anything slow: a signal during start-up is honoured too
    try:
        with distributed(env, cfg.dist.backend, cfg.dist.timeout_s) as device:
            torch.manual_seed(derive_seed(cfg.train.seed, "global"))  # for PyTorch's own draws; ours are named
            mesh = dims.build_mesh(device.type, timedelta(seconds=cfg.dist.timeout_s))
            result = _train(start_run(cfg, env, dims, mesh, device, stop))
            del mesh
    finally:
        if stop.signum is None:  # after a preemption the handlers stay: late signals must not kill the exit
            stop.restore()
    return result


def _train(run: Run) -> int:
    try:
        for step in range(run.state.step, run.cfg.train.steps):
            PROGRESS.enter("step start", step)
            if run.watchdog is not None:
                run.watchdog.step_begin()
            run.faults.step_start(step)
            record(run, train_step(run, step))
            run.state.step, run.state.position = step + 1, run.batches.pos
            run.log.advance()
            if run.watchdog is not None:
                run.watchdog.step_end()
            PROGRESS.enter("stop agreement")
            if run.stop.agreed():
                return preempted(run, save_checkpoint(run))
            every = run.cfg.checkpoint.every
            if (every and run.state.step % every == 0) or run.state.step == run.cfg.train.steps:
                save_checkpoint(run)
            every = run.cfg.sample.every
            if every and run.state.step % every == 0 and run.state.step < run.cfg.train.steps:
                validate(run, run.state.step)  # the last step's samples are sample.at_end's
    finally:
        if run.watchdog is not None:
            run.watchdog.stop()
    PROGRESS.enter("finish")
    failures = finish(run)
    run.log.close()
    if failures:
        if run.env.rank == 0:
            kept = checkpoint.find_resume(run.ckpt_root, "auto")
            print(
                f"cpdit: training finished and its checkpoint is saved ({kept}), but {failures} of the final steps "
                "(loss plot, samples, export) failed; see the errors above",
                file=sys.stderr,
                flush=True,
            )
        return 1
    return 0


def record(run: Run, r: StepResult) -> None:
    """Log an optimizer step; count a skipped one and stop after train.max_bad_steps in a row."""
    done, cfg, state = run.state.step + 1, run.cfg, run.state
    if r.outcome == "overflow":  # fp16 gradient overflow: the loss scale halved; not a bad step
        run.log.event(event="loss_scale_overflow", step=done, loss_scale=state.loss_scale.scale)
    elif r.outcome == "update":
        state.consecutive_bad = 0
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            extra = {"loss_scale": state.loss_scale.scale} if state.loss_scale is not None else {}
            if run.bucket_plans is not None:  # rank 0's micro-batches: one value each, a list with accumulation
                one = len(r.batches) == 1
                for key, values in (
                    ("bucket", [b.bucket for b in r.batches]),
                    ("micro_batch", [len(b.ids) for b in r.batches]),
                    ("cp", [b.cp for b in r.batches]),
                ):
                    extra[key] = values[0] if one else values
            if run.cache is not None:
                extra["latent_cache_hits"] = run.cache.hits
            run.log.log(
                done,
                loss=r.loss,
                lr=r.lr,
                grad_norm=r.grad_norm,
                step_time=r.step_time,
                tokens_per_s=r.tokens / r.step_time,
                mem_mb=_memory_mb(run.device),
                data_time=r.data_time,
                skipped_videos=getattr(run.dataset, "skipped", 0),
                **extra,
            )
    else:  # the NaN/inf guard dropped the update
        state.consecutive_bad += 1
        state.bad_steps_total += 1
        run.log.event(event="skipped_step", step=done, loss=r.loss, grad_norm=r.grad_norm)
        if state.consecutive_bad >= cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"{state.consecutive_bad} consecutive steps with a non-finite loss or gradient (last at step {done}); "
                f"stopping (train.max_bad_steps={cfg.train.max_bad_steps}). The last good checkpoint is kept: "
                f"{checkpoint.find_resume(run.ckpt_root, 'auto')}"
            )


def save_checkpoint(run: Run):
    """Collective: a checkpoint of the current step."""
    PROGRESS.enter("checkpoint")
    cfg, done = run.cfg, run.state.step
    meta = {**run.state.state_dict(), "layout": run.dims.describe(), "config": to_yaml(cfg), "architecture": run.arch}
    return checkpoint.save(
        run.ckpt_root,
        done,
        run.modules,
        run.optimizer,
        run.ema,
        meta,
        cfg.checkpoint.keep_last,
        inject=run.faults.save_fault(done),
        inject_rank=cfg.debug.fail_rank,
    )


def preempted(run: Run, saved) -> int:
    done = run.state.step
    run.log.event(event="preempted", step=done, checkpoint=str(saved))
    run.log.close()
    if run.env.local_rank == 0:
        write_marker(run.run_dir, done, saved)
    if run.env.rank == 0:
        print(f"cpdit: preempted; checkpoint {saved} saved at step {done}", file=sys.stderr, flush=True)
    return 0 if under_torchelastic() else EXIT_PREEMPTED


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
