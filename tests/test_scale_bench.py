# bench/scale.py's overlap numbers rest on two substitutions: "compute only" must really post no transfer and
# "communication only" must really run no attention kernel, or the hidden share it prints means nothing (a refactor
# that routes the kernels around parallel/attention/blocks.py would silently turn "communication only" into the
# whole call). Checked here on real ranks, with the originals restored after each; and the script itself runs end
# to end at a toy shape, so it cannot rot between the hour-long runs at CogVideoX shapes.
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_ranks
from job_helpers import ENV

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import scale  # noqa: E402


def _attention_three_ways(rank, world, strategy):
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.attention import context_parallel_attention
    from parallel.comm import BYTES
    from parallel.sequence import SequencePlan

    ulysses = world if strategy == "ulysses" else 1
    mesh = init_device_mesh("cpu", (world // ulysses, ulysses), mesh_dim_names=("cp_ring", "cp_ulysses"))
    plan = SequencePlan(4, 6, 3, mesh)  # 4 frames x 6 tokens + 3 text tokens
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q, k, v = (plan.shard(torch.randn(1, 4, 27, 8, generator=g), 2).contiguous() for _ in range(3))

    def call():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = context_parallel_attention(qq, kk, vv, plan, strategy=strategy)
        out.sum().backward()
        return out.detach(), kk.grad

    runs = {}
    for mode, patch in (("real", None), ("compute", scale._no_transfer), ("comm", scale._no_kernels), ("again", None)):
        restore = patch() if patch else None
        BYTES.reset()
        try:
            runs[mode] = call()
        finally:
            if restore:
                restore()
    return runs


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_overlap_substitutions_remove_what_they_claim(tmp_path, strategy):
    for rank, runs in enumerate(run_ranks(_attention_three_ways, 2, tmp_path, strategy)):
        real_out, real_dk = runs["real"]
        assert torch.equal(runs["again"][0], real_out) and torch.equal(runs["again"][1], real_dk), rank  # restored
        assert not torch.allclose(runs["compute"][0], real_out), rank  # no K/V (or heads) came from the other rank
        assert torch.count_nonzero(runs["comm"][0]) == 0 and torch.count_nonzero(runs["comm"][1]) == 0, rank


@pytest.mark.slow
def test_scale_bench_runs_end_to_end_at_a_toy_shape(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [
        sys.executable,
        "bench/scale.py",
        "--shapes",
        "toy",
        "--layouts",
        "1x1x1:none,2x1x1:none,2x1x2:none",
        "--strategies",
        "2:ring",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [r["part"] for r in rows] == ["steps"] * 3 + ["frames"] * 4 + ["overlap"]
    steps = rows[:3]
    assert steps[0]["sent"] == 0 and all(r["sent"] > 0 for r in steps[1:])  # cp=2 sends, cp=1 does not
    assert all(r["params"] > 0 and r["optimizer"] == 2 * r["params"] and r["grads"] == r["params"] for r in steps)
    assert all(0 < s < p for r in steps for s, p in zip(r["saved"], r["peak"], strict=True))
    assert steps[1]["params"] < steps[0]["params"]  # FSDP2 shards over cp
    for table in ("toy: one block, 4 latent frames", "most latent frames under a 16 GiB", "Communication overlap"):
        assert table in r.stdout, r.stdout[-3000:]
    assert "cp=2 ring fwd+bwd >= 1.8x cp=1" in r.stdout and "cp=2 ulysses fwd+bwd >= 1.8x cp=1" in r.stdout
