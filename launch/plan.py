# `cpdit-launch plan`: which layouts fit. For the job a config describes (model, frames, resolution, text length,
# micro-batch) on N ranks of a given memory, every valid (dp, cp, ulysses, tp, activation checkpointing) layout
# with its predicted per-rank memory (parallel/memory_model.py: the step simulated on the meta device) and bytes
# sent per step (parallel/traffic_model.py), which fit, and the one to use with the reason. Predictions for fp32
# training of the DiT (train.mixed_precision=no); the frozen text encoder and VAE are not counted.
from __future__ import annotations

import argparse
from dataclasses import dataclass

from cpdit.first_stage import latent_frames
from cpdit.models.patch import patch_frame_padding
from cpdit.models.registry import FAMILIES, family_of
from launch.config import ConfigError, JobConfig, load_config
from parallel.dims import ParallelDims, TopologyError
from parallel.memory_model import MemoryEstimate, Workload, estimate_memory, local_params
from parallel.tensor_parallel import heads_error
from parallel.traffic_model import Traffic, estimate_traffic

GiB = 2**30
AC_CHOICES = ("none", "full")  # what the job offers (model.gradient_checkpointing false / true)
# The worst under-prediction of the memory model measured against real steps: bench/scale.py's cp=4 Ulysses step at
# CogVideoX-2B block shapes predicted 7.7% below its peak (bench/memory.py's worst: 4.0%). A layout fits only with
# this margin on top of its prediction (--margin); tests/test_plan.py recomputes it from bench/results/.
MARGIN = 0.077


@dataclass
class Candidate:
    dims: ParallelDims
    ac: str
    memory: MemoryEstimate
    traffic: Traffic

    @property
    def knobs(self) -> str:
        d = self.dims
        out = [f"parallel.cp_size={d.cp}", f"parallel.model_parallel_size={d.tp}"]
        if d.ulysses_size > 1:
            out.append(f"parallel.ulysses_size={d.ulysses_size}")
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
    return out


def plan(cfg: JobConfig, world: int, per_node: int, foreach: bool = True) -> list[Candidate]:
    m, work = workload(cfg)
    tpf = (work.height // m.patch_size) * (work.width // m.patch_size)
    root, out = _root_params(m), []
    for dims in layouts(world, m.num_attention_heads, work.token_frames, per_node):
        _, tp_part = local_params(m, dims, fsdp=cfg.parallel.fsdp)
        for ac in AC_CHOICES:
            mem = estimate_memory(
                m, work, dims, ac, fsdp=cfg.parallel.fsdp, ema=cfg.train.ema_decay > 0, foreach=foreach
            )
            traffic = estimate_traffic(
                m, work.token_frames, tpf, work.text_len, work.batch, dims, tp_part, root, ac, cfg.parallel.fsdp
            )
            out.append(Candidate(dims, ac, mem, traffic))
    return out


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
    (recomputing the forward costs about a third more compute), then the fewest bytes sent per sample (a step of
    dp x micro-batch samples costs every rank the same compute per sample whatever the layout; what differs is the
    communication), then the most data parallelism."""
    fitting = [c for c in cands if fits(c, budget, margin)]
    if not fitting:
        best = min(cands, key=lambda c: c.memory.total)
        return None, (
            f"no layout fits {budget / GiB:.3g} GiB per rank (--headroom of --device-memory-gib) with the "
            f"{margin:.1%} margin; the smallest needs {best.memory.total / GiB:.3g} GiB "
            f"({best.knobs}): use more ranks, fewer frames or a smaller micro-batch"
        )
    best = min(fitting, key=lambda c: (c.ac != "none", c.traffic.total / c.dims.dp, -c.dims.dp))
    why = (
        f"it fits ({best.memory.total / GiB:.1f} of {budget / GiB:.3g} GiB, {margin:.1%} margin), "
        + (
            "needs no activation checkpointing, "
            if best.ac == "none"
            else "needs activation checkpointing (no layout fits without it), "
        )
        + f"and of those sends the least per sample ({best.traffic.total / best.dims.dp / GiB:.2f} GiB per rank)"
    )
    return best, why


def table(cands: list[Candidate], budget: float, margin: float = MARGIN) -> str:
    """Every candidate, smallest first, in GiB (MiB when all are under 1 GiB)."""
    unit, name = (GiB, "GiB") if max(c.memory.total for c in cands) >= GiB else (2**20, "MiB")
    rows = [
        "| dp | cp | ulysses | tp | AC | params | grads | optimizer | activations | FSDP buffers | comm buffers | "
        f"step buffers | total {name}/rank | fits | {name} sent/rank/step | per sample |",
        "|" + "---|" * 16,
    ]
    for c in sorted(cands, key=lambda c: c.memory.total):
        m, d = c.memory, c.dims
        g = [m.params, m.grads, m.optimizer, m.activations, m.fsdp_buffers, m.comm_buffers, m.step_buffers]
        rows.append(
            f"| {d.dp} | {d.cp} | {d.ulysses_size} | {d.tp} | {c.ac} | "
            + " | ".join(f"{v / unit:.2f}" for v in g)
            + f" | {m.total / unit:.2f} | {'yes' if fits(c, budget, margin) else 'no'} | "
            f"{c.traffic.total / unit:.2f} | {c.traffic.total / d.dp / unit:.2f} |"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpdit-launch plan",
        description="Predict per-rank memory and traffic of every layout of a job and recommend one (fp32 "
        "training of the DiT; the meta-device simulation of parallel/memory_model.py).",
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
        default=MARGIN,
        help=f"a layout fits when its prediction x (1 + margin) is within the budget (default {MARGIN}: the worst "
        "under-prediction measured, bench/README.md)",
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
        if args.margin < 0:
            raise ConfigError(f"--margin={args.margin} must be >= 0")
        world = args.nproc_per_node * args.nnodes
        m, work = workload(cfg)
        cands = plan(cfg, world, args.nproc_per_node, foreach=args.device == "cuda")
    except (ConfigError, TopologyError) as err:
        print(f"cpdit-launch plan: error: {err}")
        return 2
    patches = f" ({work.token_frames} patch-frames of {work.frames_per_patch})" if work.frames_per_patch > 1 else ""
    print(
        f"cpdit-launch plan: {cfg.model.preset} ({m.num_layers} layers, hidden {m.hidden_size}), "
        f"{work.frames} latent frames{patches} of {work.height}x{work.width}, {work.text_len} text tokens, micro-batch "
        f"{work.batch}, {world} ranks of {args.device_memory_gib:g} GiB (a layout fits when its prediction plus "
        f"{args.margin:.1%}, the model's worst under-prediction measured, is within {args.headroom:.0%} of it); "
        "fp32 training, predicted per rank (PREDICTIONS of parallel/memory_model.py, not measurements):\n"
    )
    budget = args.device_memory_gib * GiB * args.headroom
    print(table(cands, budget, args.margin))
    best, why = recommend(cands, budget, args.margin)
    print()
    if best is None:
        print(f"recommendation: none — {why}")
        return 1
    print(f"recommendation: {best.knobs} (dp={best.dims.dp}): {why}")
    return 0
