# The README's table of `cpdit-launch plan` answers for the CogVideoX checkpoints, regenerated: every row is the
# planner run as a user runs it (a subprocess), its recommendation, predicted peak, bytes across nodes and how many
# layouts fit, written to bench/results/plan_rows.json and printed as the README's table.
#
#   python bench/plan_rows.py            # every row (fp32 rows take seconds to minutes, the bf16 row longer)
#   python bench/plan_rows.py --only 0,7 # some rows
#   python bench/plan_rows.py --check    # every row against README.md's table: exit 1 on any difference
#
# The T5-XXL row needs only T5-XXL's config.json (its architecture: d_model 4096, 24 layers, d_ff 10240, 64 heads);
# the script writes that file into a temporary directory.
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPE = ["data.num_frames=49", "data.height=480", "data.width=720", "data.batch_size=1", "train.text_max_length=226"]
VAE = ["first_stage.kind=vae", "first_stage.preset=cogvideox"]
SHAPE_15 = [
    "data.num_frames=81",
    "data.height=768",
    "data.width=1360",
    "data.batch_size=1",
    "train.text_max_length=226",
]
T5_XXL = {
    "model_type": "t5",
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
}
ROWS = [  # (label, nodes, overrides)
    ("CogVideoX-2B", 1, ["model.preset=cogvideox-2b", *VAE, *SHAPE]),
    ("CogVideoX-2B", 2, ["model.preset=cogvideox-2b", *VAE, *SHAPE]),
    ("CogVideoX-5B", 1, ["model.preset=cogvideox-5b", *VAE, *SHAPE]),
    ("CogVideoX-5B", 2, ["model.preset=cogvideox-5b", *VAE, *SHAPE]),
    ("CogVideoX-5B", 8, ["model.preset=cogvideox-5b", *VAE, *SHAPE]),
    ("CogVideoX-5B", 32, ["model.preset=cogvideox-5b", *VAE, *SHAPE]),
    ("CogVideoX-5B-I2V", 1, ["model.preset=cogvideox-5b-i2v", *VAE, *SHAPE]),
    ("CogVideoX1.5-5B, 81 frames of 768x1360", 1, ["model.preset=cogvideox1.5-5b", *VAE, *SHAPE_15]),
    ("CogVideoX1.5-5B-I2V, 81 frames of 768x1360", 1, ["model.preset=cogvideox1.5-5b-i2v", *VAE, *SHAPE_15]),
    ("CogVideoX-5B, precomputed latents", 1, ["model.preset=cogvideox-5b", *VAE, *SHAPE, "data.dataset=precomputed"]),
    ("CogVideoX-5B, T5-XXL in memory", 1, ["model.preset=cogvideox-5b", *VAE, *SHAPE, "text.encoder=t5"]),
    ("CogVideoX-5B, bf16", 1, ["model.preset=cogvideox-5b", *VAE, *SHAPE, "train.mixed_precision=bf16"]),
]


def run_row(label: str, nodes: int, overrides: list[str], t5_dir: Path) -> dict:
    extra = [f"text.path={t5_dir}", "model.text_embed_dim=4096"] if "text.encoder=t5" in overrides else []
    if "data.dataset=precomputed" in overrides:
        extra.append("data.path=unused-by-the-planner")
    cmd = [sys.executable, "-m", "launch", "plan", "--nproc-per-node", "8", "--nnodes", str(nodes), *overrides, *extra]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - t0
    rows = [ln for ln in r.stdout.splitlines() if re.match(r"\| \d", ln)]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    fit = [c for c in cells if c[15] == "yes"]
    rec = re.search(r"recommendation: (.*?) \(dp=(\d+)\): it fits \(([\d.]+) of", r.stdout)
    frozen = re.search(r"frozen VAE \+ T5 weights in memory: ([\d.]+) GiB", r.stdout)
    out = {
        "label": label,
        "ranks": 8 * nodes,
        "nodes": nodes,
        "command": " ".join(cmd[3:]),
        "exit": r.returncode,
        "seconds": round(seconds, 1),
        "layouts": len(cells),
        "fit": len(fit),
        "fit_without_checkpointing": sum(c[5] == "none" for c in fit),
        "frozen_gib": float(frozen[1]) if frozen else None,
    }
    if rec:
        knobs, dp, peak = rec[1], int(rec[2]), float(rec[3])
        best = next(c for c in fit if abs(float(c[14]) - peak) < 0.051 and int(c[0]) == dp) if fit else None
        out.update(knobs=knobs, dp=dp, peak_gib=peak)
        if best is not None:
            out.update(sent_gib=float(best[16]), across_nodes_gib=float(best[17]))
    else:
        out["answer"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | ranks | recommended | predicted peak per rank | GiB sent per rank per step (across nodes) | "
        "layouts that fit (of which without checkpointing) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ranks = f"{r['ranks']}" + (f" ({r['nodes']} nodes)" if r["nodes"] > 1 else "")
        if "knobs" in r:
            sent = f"{r.get('sent_gib', 0):.2f} ({r.get('across_nodes_gib', 0):.2f})"
            lines.append(
                f"| {r['label']} | {ranks} | `{r['knobs']}` (dp={r['dp']}) | {r['peak_gib']} GiB | {sent} | "
                f"{r['fit']} of {r['layouts']} ({r['fit_without_checkpointing']}) |"
            )
        else:
            lines.append(f"| {r['label']} | {ranks} | none fits | - | - | 0 of {r['layouts']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=None, help="comma-separated row indices")
    ap.add_argument(
        "--check", action="store_true", help="compare every row with README.md's table; exit 1 if any differs"
    )
    args = ap.parse_args(argv)
    picks = [int(i) for i in args.only.split(",")] if args.only else range(len(ROWS))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(T5_XXL))
        for i in picks:
            out.append(run_row(*ROWS[i], Path(tmp)))
            print(json.dumps(out[-1]), flush=True)
    print("\n" + table(out))
    if args.check:
        readme = (ROOT / "README.md").read_text().split("## Which layout fits", 1)[1].split("\n## ", 1)[0]
        have = {ln for ln in readme.splitlines() if ln.startswith("| CogVideoX")}
        wrong = [ln for ln in table(out).splitlines()[2:] if ln not in have]
        for ln in wrong:
            print(f"README.md's table differs from the planner: {ln}", file=sys.stderr)
        return 1 if wrong else 0
    if not args.only:
        dest = ROOT / "bench" / "results" / "plan_rows.json"
        dest.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d"), "rows": out}, indent=1) + "\n")
        print(f"\nwrote {dest.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
