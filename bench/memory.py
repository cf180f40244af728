# Validation of the layout planner's models against real steps: for each layout, the per-rank peak memory of one
# fp32 training step (forward, backward, AdamW step) predicted by parallel/memory_model.py (the step simulated on
# the meta device) next to the one measured by parallel/memory_probe.py (malloc's live bytes after every op, the
# largest rank, median of 3 steps), and the bytes sent per step predicted by parallel/traffic_model.py next to
# parallel.all_traffic.count_all_traffic's count.
#
#   python bench/memory.py                      # small and mid shapes, layouts up to 4 ranks
#   python bench/memory.py --json bench/results/memory.json
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpdit import CogVideoXConfig  # noqa: E402
from launch.spawn import spawn_ranks  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402
from parallel.fake_memory import fake_step_memory  # noqa: E402
from parallel.memory_model import Workload, estimate_memory, local_params  # noqa: E402
from parallel.memory_probe import measure_layout  # noqa: E402
from parallel.traffic_model import estimate_traffic  # noqa: E402

SHAPES = {
    # name: (config overrides of the tiny preset, workload)
    "small": (
        dict(num_attention_heads=4, attention_head_dim=32, num_layers=2, time_embed_dim=64, text_embed_dim=64),
        Workload(frames=8, height=32, width=32, text_len=24),
    ),
    "mid": (
        dict(num_attention_heads=12, attention_head_dim=64, num_layers=4, time_embed_dim=256, text_embed_dim=256),
        Workload(frames=13, height=16, width=16, text_len=226),
    ),
}
LAYOUTS = (
    "1x1x1:none,1x1x1:full,2x1x1:none,2x1x1:full,2x1x2:none,1x2x1:none,2x2x1:none,2x2x1:full,4x1x1:none,4x1x2:none"
)


def memory_error(r: dict, key: str = "predicted") -> float:
    """A row's prediction error: predicted / measured peak - 1 (negative: under-predicted); `key` "predicted_fake":
    parallel/fake_memory.py's."""
    return r[key] / r["measured"] - 1


def sent_error(r: dict) -> str:
    """A row's predicted / measured bytes - 1, or "-" where nothing was sent."""
    return f"{r['predicted_sent'] / r['sent'] - 1:+.1%}" if r["sent"] else "-"


def report_fake(rows: list[dict]) -> str:
    """The fake run's predictions (parallel/fake_memory.py) against the measured peaks."""
    MiB = 2**20
    out = [
        "| shape | params | cp | ulysses | tp | AC | measured MiB/rank | fake-run prediction | error | MiB sent/rank | "
        "predicted | error |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        sent_err = sent_error(r)
        out.append(
            f"| {r['shape']} | {r.get('param_dtype', 'float32')} | {r['cp']} | {r['ulysses']} | {r['tp']} | "
            f"{r['ac']} | {r['measured'] / MiB:.1f} | {r['predicted_fake'] / MiB:.1f} | "
            f"{memory_error(r, 'predicted_fake'):+.1%} | {r['sent'] / MiB:.2f} | {r['predicted_sent'] / MiB:.2f} | "
            f"{sent_err} |"
        )
    worst = min(memory_error(r, "predicted_fake") for r in rows)
    out.append(f"\n- fake run: worst under-prediction {min(worst, 0):.1%}")
    return "\n".join(out)


def _config(name: str) -> CogVideoXConfig:
    return CogVideoXConfig.preset("tiny", **SHAPES[name][0])


def _root_elements(cfg) -> int:
    from cpdit.models.registry import family_of

    with torch.device("meta"):
        model = family_of(cfg).model_class(cfg)
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())


def run(name: str, cp: int, tp: int, ulysses: int, ac: str, param_dtype: torch.dtype | None = None) -> dict:
    cfg, w = _config(name), SHAPES[name][1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        spawn_ranks(measure_layout, cp * tp, cfg, w, cp, tp, ulysses, ac, str(out), param_dtype, directory=tmp)
        rows = json.loads(out.read_text())
    dims = ParallelDims(cp * tp, cp, tp, ulysses)
    fake = fake_step_memory(cfg, w, dims, ac, param_dtype=param_dtype, foreach=False)  # CPU: per-tensor AdamW
    _, tp_part = local_params(cfg, dims)
    tpf = (w.height // cfg.patch_size) * (w.width // cfg.patch_size)
    root = _root_elements(cfg)  # outside the blocks nothing is tensor-parallel
    size = 4 if param_dtype is None else 2
    traffic = estimate_traffic(cfg, w.frames, tpf, w.text_len, w.batch, dims, tp_part, root, ac, compute_bytes=size)
    if param_dtype is not None:  # the analytic model is fp32-only: the fake run is the prediction
        return dict(
            sent=max(r["sent"] for r in rows),
            predicted_sent=traffic.total,
            shape=name,
            cp=cp,
            tp=tp,
            ulysses=ulysses,
            ac=ac,
            param_dtype=str(param_dtype).removeprefix("torch."),
            measured=max(r["peak"] for r in rows),
            per_rank=[r["peak"] for r in rows],
            predicted_fake=fake["total"],
            breakdown_fake=fake,
        )
    est = estimate_memory(cfg, w, dims, ac, foreach=False)  # CPU: AdamW's per-tensor step
    return dict(
        shape=name,
        cp=cp,
        tp=tp,
        ulysses=ulysses,
        ac=ac,
        measured=max(r["peak"] for r in rows),
        per_rank=[r["peak"] for r in rows],
        predicted=est.total,
        breakdown=dataclasses.asdict(est),
        predicted_fake=fake["total"],
        sent=max(r["sent"] for r in rows),
        predicted_sent=traffic.total,
    )


def report(rows: list[dict]) -> str:
    MiB = 2**20
    out = [
        "| shape | cp | ulysses | tp | AC | measured MiB/rank | predicted | error | MiB sent/rank | predicted | "
        "error |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        err = memory_error(r)
        sent_err = sent_error(r)
        out.append(
            f"| {r['shape']} | {r['cp']} | {r['ulysses']} | {r['tp']} | {r['ac']} | {r['measured'] / MiB:.1f} | "
            f"{r['predicted'] / MiB:.1f} | {err:+.1%} | {r['sent'] / MiB:.2f} | {r['predicted_sent'] / MiB:.2f} | "
            f"{sent_err} |"
        )
    worst = max(abs(memory_error(r)) for r in rows)
    out.append(
        f"\n- memory: every layout within 10% of measured: {'met' if worst <= 0.10 else 'not met'} (worst {worst:.1%})"
    )
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Memory and traffic models of the layout planner vs measured steps.")
    p.add_argument("--shapes", default="small,mid")
    p.add_argument("--layouts", default=LAYOUTS, help="cp x tp x ulysses : AC, comma-separated")
    p.add_argument("--json", default=None, help="write every row here")
    p.add_argument(
        "--param-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: FSDP2 all-gathers bf16 with autocast (train.mixed_precision=bf16), predicted by the fake run only",
    )
    p.add_argument("--report", default=None, help="print the table of a --json file and exit")
    args = p.parse_args(argv)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.param_dtype]
    if args.report:
        rows = json.loads(Path(args.report).read_text())
        print(report_fake(rows) if "predicted" not in rows[0] else report(rows) + "\n\n" + report_fake(rows))
        return
    rows = []
    for name in args.shapes.split(","):
        for item in args.layouts.split(","):
            layout, ac = item.split(":")
            cp, tp, u = (int(v) for v in layout.split("x"))
            rows.append(run(name, cp, tp, u, ac, dtype))
            print(
                f"{name} cp={cp} tp={tp} ulysses={u} {ac}: measured {rows[-1]['measured']} predicted "
                f"{rows[-1].get('predicted')} fake run {rows[-1]['predicted_fake']}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\nPer-rank peak of one {args.param_dtype} training step, torch {torch.__version__}, CPU/gloo\n")
    print(report_fake(rows) if dtype is not None else report(rows) + "\n\n" + report_fake(rows))


if __name__ == "__main__":
    main()
