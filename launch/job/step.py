# One optimizer step: accumulate the micro-batches' gradients, reduce them, clip, and update (with the fp16 loss
# scale and the NaN/inf guard), then the EMA. What it did is returned; the loop logs it.
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from launch.job.data import MicroBatch
from launch.job.ema import ema_update
from launch.job.loss import micro_batch_loss
from parallel.fsdp import reduce_gradients
from parallel.grad_norm import clip_grad_norm
from parallel.progress import PROGRESS, in_collective


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float, start_ratio: float = 0.0) -> float:
    """SAT's LambdaWarmUpCosineScheduler with lr_max 1, lr_start `start_ratio`, lr_min `min_ratio` and
    max_decay_steps `total`: linear from start_ratio at step 0 towards 1 over `warmup` steps, then cosine down to
    min_ratio at step `total`."""
    if step < warmup:
        return (1.0 - start_ratio) / warmup * step + start_ratio
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * t))


@dataclass
class StepResult:
    outcome: str
    """"update", "overflow" (fp16: the loss scale halved, the update skipped) or "skipped" (non-finite loss or
    gradient: the NaN guard dropped the update)."""
    loss: float
    """The global-batch mean loss (identical on every rank)."""
    grad_norm: float
    lr: float
    data_time: float
    step_time: float
    tokens: int = 0
    """Tokens of the step's clips, every data-parallel group's."""
    batches: list[MicroBatch] = field(default_factory=list)
    """This rank's micro-batches (their videos dropped): bucket, clips and cp degree of each."""


def train_step(run, step: int) -> StepResult:
    """Collective. Optimizer step `step` (0-based) of the run; the gradients are zeroed at the end."""
    cfg, state = run.cfg, run.state
    t0 = time.perf_counter()
    o = cfg.optim
    lr = o.lr * lr_multiplier(step, o.warmup_steps, o.decay_steps or cfg.train.steps, o.min_lr_ratio, o.start_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    scaler = state.loss_scale
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    data_time, taken = 0.0, []
    for micro in range(cfg.train.grad_accum):
        PROGRESS.enter("data")
        t_data = time.perf_counter()
        batch = run.batches.next()
        data_time += time.perf_counter() - t_data
        taken.append(replace(batch, video=None))
        with run.parallel.cp_degree(batch.cp):  # the backward too: activation checkpointing recomputes in it
            loss = micro_batch_loss(run, step, micro, batch)
            PROGRESS.enter("backward")
            (loss * scaler.scale if scaler is not None else loss).backward()
        loss_sum += loss.detach().double()
    PROGRESS.enter("gradient reduction")
    reduce_gradients(run.modules)  # parallel.fsdp=false: once, after the last micro-step
    PROGRESS.enter("loss reduction")
    with in_collective("all_reduce(loss)"):
        dist.all_reduce(loss_sum, group=run.mesh.get_group("dp_cp"))
    global_loss = loss_sum.item() / run.dims.dp
    if run.faults.nan_loss(step):
        global_loss = float("nan")
    PROGRESS.enter("gradient norm")
    norm = clip_grad_norm(run.params, o.grad_clip, 1.0 / scaler.scale if scaler is not None else 1.0)
    if scaler is not None and math.isfinite(global_loss) and not scaler.update(norm):
        outcome = "overflow"
    elif math.isfinite(global_loss) and math.isfinite(norm):
        outcome = "update"
        PROGRESS.enter("optimizer")
        run.optimizer.step()
        if run.ema is not None:
            ema_update(run.ema, run.modules.dit, cfg.train.ema_decay)
    else:
        outcome = "skipped"
    step_time = time.perf_counter() - t0
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(outcome, global_loss, norm, lr, data_time, step_time, taken[0].step_tokens, taken)
