# `cpdit-launch plan`: which layouts fit. For the job a config describes (model, frames, resolution, text length,
# micro-batch) on N ranks of a given memory, every valid (dp, cp, ulysses, tp, activation checkpointing) layout
# with its predicted per-rank memory (parallel/memory_model.py: the step simulated on the meta device) and bytes
# sent per step (parallel/traffic_model.py), which fit, and the one to use with the reason. fp32 training is
# predicted by the meta-device simulation; bf16 and fp16 training (train.mixed_precision: FSDP2 all-gathers in that
# dtype, autocast) by the job's own step run on fake tensors (parallel/fake_memory.py), which the simulation cannot
# model. The frozen VAE and T5 are counted (their weights) while they are in memory: not when training from a
# precomputed directory (data.dataset=precomputed).
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

from cpdit.first_stage import latent_frames
from cpdit.models.patch import patch_frame_padding
from cpdit.models.registry import FAMILIES, family_of
from launch.config import ConfigError, JobConfig, load_config
from parallel.dims import ParallelDims, TopologyError
from parallel.memory_model import MemoryEstimate, Workload, estimate_memory, local_params
from parallel.tensor_parallel import heads_error
from parallel.traffic_model import Traffic, across_nodes, estimate_traffic

GiB = 2**30
AC_CHOICES = ("none", "full")  # what the job offers (model.gradient_checkpointing false / true)
# The worst under-prediction of the memory model measured against real steps: bench/scale.py's cp=4 Ulysses step at
# CogVideoX-2B block shapes predicted 7.7% below its peak (bench/memory.py's worst: 4.0%). A layout fits only with
# this margin on top of its prediction (--margin); tests/test_plan.py recomputes it from bench/results/.
MARGIN = 0.077
# The same for the fake-tensor run of bf16 training: its worst under-prediction over bench/memory.py --param-dtype
# bf16's 20 measured layouts (small cp4: 5.4% below).
MARGIN_MIXED = 0.054


def margin_for(cfg: JobConfig) -> float:
    return MARGIN if cfg.train.mixed_precision == "no" else MARGIN_MIXED


@dataclass
class Candidate:
    dims: ParallelDims
    ac: str
    memory: MemoryEstimate
    traffic: Traffic
    inter_node: int = 0
    """Of the bytes a rank sends per step, those that cross nodes (parallel/traffic_model.py across_nodes)."""

    @property
    def knobs(self) -> str:
        d = self.dims
        out = [f"parallel.cp_size={d.cp}", f"parallel.model_parallel_size={d.tp}"]
        if d.ulysses_size > 1:
            out.append(f"parallel.ulysses_size={d.ulysses_size}")
        if d.dp_replicate > 1:
            out.append(f"parallel.dp_replicate={d.dp_replicate}")
        if self.ac != "none":
            out.append("model.gradient_checkpointing=true")
        return " ".join(out)


def workload(cfg: JobConfig) -> tuple[object, Workload]:
    """The DiT config and one micro-batch's latent shape of the job `cfg` describes."""
    from launch.preflight import checked_first_stage, checked_model_config

    dims = ParallelDims(1)
    _, tf, sf = checked_first_stage(cfg, dims)
    m = checked_model_config(cfg)
    family = family_of(m)
    if not family.planned:
        planned = " and ".join(f.title for f in FAMILIES.values() if f.planned)
        raise ConfigError(
            f"model.preset={cfg.model.preset}: cpdit-launch plan models the {planned} family (full attention over "
            f"[text | frames]); the {family.title} family's step is not simulated yet"
        )
    d = cfg.data
    frames = latent_frames(d.num_frames, tf)
    frames += patch_frame_padding(frames, m.frames_per_patch)  # CogVideoX 1.5: leading copies of frame 0
    return m, Workload(
        frames, d.height // sf, d.width // sf, cfg.train.text_max_length, d.batch_size, m.frames_per_patch
    )


def layouts(world: int, heads: int, frames: int, per_node: int) -> list[ParallelDims]:
    """Every layout of `world` ranks the model and the clip allow: tp divides the heads and stays inside a node,
    cp at most the latent frames, ulysses a divisor of cp that divides the heads per tp rank; dp the rest."""
    out = []
    for tp in range(1, min(world, per_node) + 1):
        if world % tp or heads_error(heads, tp):
            continue
        for cp in range(1, min(world // tp, frames) + 1):
            if (world // tp) % cp:
                continue
            for u in range(1, cp + 1):
                if cp % u or (heads // tp) % u:
                    continue
                out.append(ParallelDims(world, cp, tp, u))
                # HSDP: FSDP2 shards within a node and replicates across nodes (parallel.dp_replicate)
                nodes, dp = world // per_node, world // (tp * cp)
                if nodes > 1 and world % per_node == 0 and per_node % (tp * cp) == 0 and dp % nodes == 0:
                    out.append(ParallelDims(world, cp, tp, u, dp_replicate=nodes))
    return out


def plan(cfg: JobConfig, world: int, per_node: int, foreach: bool = True, progress=None) -> list[Candidate]:
    m, work = workload(cfg)
    tpf = (work.height // m.patch_size) * (work.width // m.patch_size)
    root, out = _root_params(m), []
    frozen = frozen_bytes(cfg)
    size = 4 if cfg.train.mixed_precision == "no" else 2
    seen: dict[tuple, MemoryEstimate] = {}  # a rank's memory depends on its shard group, not on the replicas
    for dims in layouts(world, m.num_attention_heads, work.token_frames, per_node):
        _, tp_part = local_params(m, dims, fsdp=cfg.parallel.fsdp)
        for ac in AC_CHOICES:
            key = (dims.tp, dims.cp, dims.ulysses_size, dims.size("dp_shard_cp"), dims.dp_replicate > 1, ac)
            if key not in seen:
                if progress is not None:
                    progress(f"{dims.describe()} AC={ac}")
                seen[key] = step_memory(cfg, m, work, dims, ac, foreach)
            mem = replace(seen[key], frozen=frozen)
            traffic = estimate_traffic(
                m, work.token_frames, tpf, work.text_len, work.batch, dims, tp_part, root, ac, cfg.parallel.fsdp, size
            )
            out.append(Candidate(dims, ac, mem, traffic, across_nodes(traffic, dims, per_node)))
    return out


def step_memory(cfg: JobConfig, m, work: Workload, dims: ParallelDims, ac: str, foreach: bool) -> MemoryEstimate:
    """One rank's training step: the meta-device simulation (fp32), or the job's step on fake tensors (bf16, fp16)."""
    fsdp, ema = cfg.parallel.fsdp, cfg.train.ema_decay > 0
    if cfg.train.mixed_precision == "no":
        return estimate_memory(m, work, dims, ac, fsdp=fsdp, ema=ema, foreach=foreach)
    from launch.job.build import AMP_DTYPES
    from parallel.fake_memory import fake_step_memory

    run = fake_step_memory(
        m, work, dims, ac, param_dtype=AMP_DTYPES[cfg.train.mixed_precision], fsdp=fsdp, foreach=foreach
    )
    kept = local_params(m, dims, fsdp=fsdp)[0] * 4  # the fp32 shard each rank keeps: an EMA copy's size
    return MemoryEstimate(
        params=run["params"],
        grads=run["grads"],
        optimizer=run["optimizer"] + (kept if ema else 0),
        activations=run["activations"],
        fsdp_buffers=run["fsdp_buffers"],
        step_buffers=run["temporaries"],
    )


def frozen_bytes(cfg: JobConfig) -> int:
    """The weights of the frozen modules each rank holds while training: the VAE (first_stage.kind=vae) and a frozen
    T5 (text.encoder=t5), as the job loads them (fp32); none when training from precomputed data, which leaves them
    out. Their activations while encoding are not modelled (the VAE encodes before the DiT's forward)."""
    import torch

    if cfg.data.dataset == "precomputed":
        return 0
    total = 0
    if cfg.first_stage.kind == "vae":
        from cpdit.vae import CogVideoXVAE
        from launch.job.build import first_stage_config

        with torch.device("meta"):
            total += sum(p.numel() * 4 for p in CogVideoXVAE(first_stage_config(cfg)).parameters())
    if cfg.text.encoder == "t5":
        try:
            from transformers import T5Config, T5EncoderModel
        except ImportError as err:
            raise ConfigError(f"text.encoder='t5' needs transformers ({err}): pip install 'cpdit[t5]'") from None
        try:
            config = T5Config.from_pretrained(cfg.text.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"text.path={cfg.text.path!r}: no T5 config to count its weights from ({err})") from None
        with torch.device("meta"):
            t5 = T5EncoderModel(config)
        total += sum(p.numel() * 4 for p in t5.parameters())
    return total


def _root_params(m) -> int:
    """Elements outside the blocks (one FSDP2 unit, not tensor-parallel)."""
    import torch

    with torch.device("meta"):
        model = family_of(m).model_class(m)
    in_blocks = sum(p.numel() for p in model.blocks.parameters())
    return sum(p.numel() for p in model.parameters()) - in_blocks


def fits(c: Candidate, budget: float, margin: float = MARGIN) -> bool:
    """Whether the predicted peak, raised by the measured under-prediction `margin`, is within `budget`."""
    return c.memory.total * (1 + margin) <= budget


def recommend(cands: list[Candidate], budget: float, margin: float = MARGIN) -> tuple[Candidate | None, str]:
    """The layout to use, of those that fit `budget` with `margin`: without activation checkpointing if any fits
    (recomputing the forward costs about a third more compute), then the fewest bytes sent across nodes per sample
    (the inter-node link is the slow one), then the fewest bytes sent per sample (a step of dp x micro-batch samples
    costs every rank the same compute per sample whatever the layout; what differs is the communication), then the
    most data parallelism."""
    fitting = [c for c in cands if fits(c, budget, margin)]
    if not fitting:
        best = min(cands, key=lambda c: c.memory.total)
        return None, (
            f"no layout fits {budget / GiB:.3g} GiB per rank (--headroom of --device-memory-gib) with the "
            f"{margin:.1%} margin; the smallest needs {best.memory.total / GiB:.3g} GiB "
            f"({best.knobs}): use more ranks, fewer frames or a smaller micro-batch"
        )
    best = min(
        fitting, key=lambda c: (c.ac != "none", c.inter_node / c.dims.dp, c.traffic.total / c.dims.dp, -c.dims.dp)
    )
    why = (
        f"it fits ({best.memory.total / GiB:.1f} of {budget / GiB:.3g} GiB, {margin:.1%} margin), "
        + (
            "needs no activation checkpointing, "
            if best.ac == "none"
            else "needs activation checkpointing (no layout fits without it), "
        )
        + (
            f"and of those sends the least across nodes per sample ({best.inter_node / best.dims.dp / GiB:.2f} GiB "
            f"per rank; {best.traffic.total / best.dims.dp / GiB:.2f} GiB in all)"
            if any(c.inter_node for c in cands)
            else f"and of those sends the least per sample ({best.traffic.total / best.dims.dp / GiB:.2f} GiB per rank)"
        )
    )
    return best, why


def table(cands: list[Candidate], budget: float, margin: float = MARGIN) -> str:
    """Every candidate, smallest first, in GiB (MiB when all are under 1 GiB)."""
    unit, name = (GiB, "GiB") if max(c.memory.total for c in cands) >= GiB else (2**20, "MiB")
    rows = [
        "| dp | replicas | cp | ulysses | tp | AC | params | grads | optimizer | activations | FSDP buffers | "
        f"comm buffers | step buffers | frozen VAE + T5 | total {name}/rank | fits | {name} sent/rank/step | "
        "across nodes | per sample | across nodes per sample |",
        "|" + "---|" * 20,
    ]
    for c in sorted(cands, key=lambda c: c.memory.total):
        m, d = c.memory, c.dims
        g = [m.params, m.grads, m.optimizer, m.activations, m.fsdp_buffers, m.comm_buffers, m.step_buffers, m.frozen]
        rows.append(
            f"| {d.dp} | {d.dp_replicate} | {d.cp} | {d.ulysses_size} | {d.tp} | {c.ac} | "
            + " | ".join(f"{v / unit:.2f}" for v in g)
            + f" | {m.total / unit:.2f} | {'yes' if fits(c, budget, margin) else 'no'} | "
            f"{c.traffic.total / unit:.2f} | {c.inter_node / unit:.2f} | {c.traffic.total / d.dp / unit:.2f} | "
            f"{c.inter_node / d.dp / unit:.2f} |"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpdit-launch plan",
        description="Predict per-rank memory and traffic of every layout of a job and recommend one (fp32 "
        "training: the meta-device simulation of parallel/memory_model.py; train.mixed_precision=bf16 or fp16: the "
        "job's own step on fake tensors, parallel/fake_memory.py, a few seconds per layout).",
    )
    p.add_argument("--nproc-per-node", type=int, default=8, help="ranks per node (tensor parallelism stays inside)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes")
    p.add_argument("--device-memory-gib", type=float, default=80.0, help="memory of one device in GiB (default 80)")
    p.add_argument(
        "--headroom",
        type=float,
        default=0.9,
        help="fraction of the device a layout may use (the rest: CUDA context, NCCL, fragmentation)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help=f"a layout fits when its prediction x (1 + margin) is within the budget (default: the worst "
        f"under-prediction measured, bench/README.md: {MARGIN} for fp32, {MARGIN_MIXED} for bf16/fp16)",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda: AdamW's multi-tensor step (one parameter-sized temporary); cpu: per-tensor",
    )
    p.add_argument("rest", nargs="*", metavar="config.yaml | key=value", help="the job's config, as for train")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    files = [r for r in args.rest if "=" not in r]
    overrides = [r for r in args.rest if "=" in r]
    try:
        cfg = load_config(*files, overrides=overrides)
        if args.nproc_per_node < 1 or args.nnodes < 1:
            raise ConfigError(f"--nproc-per-node={args.nproc_per_node} and --nnodes={args.nnodes} must be >= 1")
        if args.device_memory_gib <= 0:
            raise ConfigError(f"--device-memory-gib={args.device_memory_gib} must be > 0")
        if not 0 < args.headroom <= 1:
            raise ConfigError(f"--headroom={args.headroom} must be in (0, 1]")
        if args.margin is None:
            args.margin = margin_for(cfg)
        if args.margin < 0:
            raise ConfigError(f"--margin={args.margin} must be >= 0")
        world = args.nproc_per_node * args.nnodes
        bucketed = cfg
        if cfg.data.buckets:  # layouts for the bucket of the most tokens per micro-batch; per bucket below
            from launch.bucket_plan import largest_bucket_config

            cfg = largest_bucket_config(cfg, world)
        m, work = workload(cfg)
        progress = None
        if cfg.train.mixed_precision != "no":
            progress = lambda what: print(f"  running the step on fake tensors: {what}", file=sys.stderr, flush=True)  # noqa: E731
        cands = plan(cfg, world, args.nproc_per_node, foreach=args.device == "cuda", progress=progress)
    except (ConfigError, TopologyError) as err:
        print(f"cpdit-launch plan: error: {err}")
        return 2
    patches = f" ({work.token_frames} patch-frames of {work.frames_per_patch})" if work.frames_per_patch > 1 else ""
    print(
        f"cpdit-launch plan: {cfg.model.preset} ({m.num_layers} layers, hidden {m.hidden_size}), "
        f"{work.frames} latent frames{patches} of {work.height}x{work.width}, {work.text_len} text tokens, micro-batch "
        f"{work.batch}, {world} ranks of {args.device_memory_gib:g} GiB (a layout fits when its prediction plus "
        f"{args.margin:.1%}, the model's worst under-prediction measured, is within {args.headroom:.0%} of it); "
        + (
            "fp32 training, predicted per rank (PREDICTIONS of parallel/memory_model.py, not measurements)"
            if cfg.train.mixed_precision == "no"
            else f"{cfg.train.mixed_precision} training (FSDP2 all-gathers {cfg.train.mixed_precision}, fp32 master "
            "weights and AdamW state), predicted per rank (PREDICTIONS of parallel/fake_memory.py, not measurements)"
        )
        + f"; frozen VAE + T5 weights in memory: {frozen_bytes(cfg) / GiB:.2f} GiB"
        + (" (none: precomputed data)" if cfg.data.dataset == "precomputed" else "")
        + ":\n"
    )
    budget = args.device_memory_gib * GiB * args.headroom
    print(table(cands, budget, args.margin))
    best, why = recommend(cands, budget, args.margin)
    print()
    if best is None:
        print(f"recommendation: none — {why}")
        return 1
    print(f"recommendation: {best.knobs} (dp={best.dims.dp}): {why}")
    if bucketed.data.buckets:
        from launch.bucket_plan import bucket_report

        try:
            dims = ParallelDims.from_config(bucketed.parallel, world)
        except TopologyError:
            dims = best.dims
        print()
        print(bucket_report(bucketed, dims, int(budget), args.margin))
    return 0
