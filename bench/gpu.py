# The GPU check: one script to run the day a CUDA device is lent (every CUDA line of the project is otherwise
# unexecuted). On one CUDA device, in under 8 minutes:
#   (a) kernels  every per-block kernel path of parallel/attention/kernels.py — flash (fp16/bf16 without a bias) and
#                memory-efficient (fp32, or any bias), with and without an additive bias, with fully masked rows —
#                forward (out and LSE) and backward (dq, dk, dv given the row's final out and LSE) against a float64
#                reference;
#   (b) model    the parallelized CogVideoXDiT at world size 1 under bf16 autocast at CogVideoX-2B and -5B block shapes
#                (13 latent frames of 60x90, patch 2: 1350 tokens per frame, + 226 text tokens; `--layers` blocks),
#                forward+backward: tokens/s, TFLOP/s and MFU against `--peak-tflops`;
#   (c) job      the default job for a few steps on one rank with dist.backend=nccl (sampling and export included).
# --dry-run adds (a0): the CUDA kernel calls themselves (flash and memory-efficient, forward with LSE and backward) on
# fake CUDA tensors (FakeTensorMode: the ops' meta kernels, no device), their outputs' shapes and dtypes checked
# against what the attention code expects (tests/test_cuda_paths.py runs the same cases).
# Exits 1 on any mismatch or failure, 2 without a CUDA device (unless --dry-run).
#
#   python bench/gpu.py --peak-tflops 989     # H100/H200 bf16 dense peak
#   python bench/gpu.py --dry-run             # the same three parts on CPU at small shapes, gloo (CI runs this)
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from model import step_flops  # noqa: E402

from cpdit import CogVideoXConfig, CogVideoXDiT  # noqa: E402
from parallel.attention.kernels import (  # noqa: E402
    _cuda_backward,
    _cuda_flash_ok,
    _cuda_forward,
    _math_backward,
    _math_forward,
    block_backward,
    block_forward,
)
from parallel.dims import ParallelDims  # noqa: E402
from parallel.parallelize import materialize, parallelize  # noqa: E402

# max |got - ref| / max(|ref|, 1) allowed per dtype (fp32 on the efficient kernel may use TF32-free fp32 math)
TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _bias(kind: str, shape, gen, device) -> torch.Tensor | None:
    B, H, Sq, Sk = shape
    if kind == "none":
        return None
    bias = torch.randn(B, H, Sq, Sk, generator=gen, dtype=torch.float64)
    if kind == "masked":  # some keys masked everywhere, some rows with every key masked
        bias[..., : Sk // 4] = float("-inf")
        bias[:, :, ::7, :] = float("-inf")
    return bias.to(device)


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max(|ref|, 1) where ref is finite; inf if got is not finite exactly there (a NaN or a
    finite LSE on a dead row would poison the LSE merge of the ring)."""
    got, ref = got.detach().double().cpu(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite) or not torch.equal(got[~finite], ref[~finite]):
        return float("inf")
    return ((got - ref)[finite].abs().max() / ref[finite].abs().max().clamp_min(1.0)).item() if finite.any() else 0.0


def check_kernels(device: torch.device, dtypes, shapes) -> list[dict]:
    """(a): one row per (dtype, shape, bias kind) with the kernel used and the worst forward/backward error."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for B, H, Sq, Sk, D in shapes:
            for kind in ("none", "additive", "masked"):
                q, k, v, dout = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (Sq, Sk, Sk, Sq))
                bias64 = _bias(kind, (B, H, Sq, Sk), gen, "cpu")
                scale = D**-0.5
                ref_out, ref_lse = _math_forward(q, k, v, scale, bias64)  # float64 in, float64 math
                ref_d = _math_backward(
                    dout, q, k, v, ref_out, ref_lse.masked_fill(ref_lse.isneginf(), 0.0), scale, bias64
                )
                on = [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]
                bias = None if bias64 is None else bias64.to(device=device, dtype=dtype)
                out, lse = block_forward(*on[:3], scale, bias)
                grads = block_backward(on[3], *on[:3], out, lse, scale, bias)
                if device.type == "cuda":
                    kernel = "flash" if _cuda_flash_ok(on[0], bias) else "efficient"
                else:
                    kernel = "cpu flash"
                errs = [_err(out, ref_out), _err(lse, ref_lse)] + [
                    _err(g, r) for g, r in zip(grads, ref_d, strict=True)
                ]
                rows.append(
                    dict(
                        dtype=str(dtype).removeprefix("torch."),
                        shape=(B, H, Sq, Sk, D),
                        bias=kind,
                        kernel=kernel,
                        fwd=max(errs[:2]),
                        bwd=max(errs[2:]),
                        ok=max(errs) <= TOL[dtype],
                    )
                )
    return rows


# (dtype, head size, bias): flash (fp16/bf16, D % 8 == 0, D <= 256, no bias) and memory-efficient (fp32, a bias, or
# a head size flash does not take); each at a square block and at lengths that pad (LSE to 32, bias rows to 16)
FAKE_CASES = [
    (dtype, D, bias, Sq, Sk)
    for dtype, D, bias in (
        (torch.bfloat16, 64, False),
        (torch.float16, 128, False),
        (torch.bfloat16, 64, True),
        (torch.float32, 64, False),
        (torch.float32, 64, True),
        (torch.bfloat16, 260, False),
    )
    for Sq, Sk in ((128, 128), (100, 77))
]


def fake_cuda_kernel(dtype: torch.dtype, D: int, with_bias: bool, Sq: int, Sk: int, B: int = 2, H: int = 3) -> dict:
    """(a0): the CUDA forward and backward of one block on fake CUDA tensors; `problems` lists every output whose
    shape, dtype or device differs from what the attention code expects (out and dq/dk/dv like q/k/v, LSE
    (B, H, Sq) float32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    problems = []

    def expect(name, got, shape, dt):
        if tuple(got.shape) != tuple(shape) or got.dtype != dt or got.device.type != "cuda":
            problems.append(f"{name}: {tuple(got.shape)} {got.dtype} on {got.device}, expected {tuple(shape)} {dt}")

    with FakeTensorMode():
        q = torch.empty(B, H, Sq, D, device="cuda", dtype=dtype)
        k, v = (torch.empty(B, H, Sk, D, device="cuda", dtype=dtype) for _ in range(2))
        bias = torch.empty(1, H, Sq, Sk, device="cuda", dtype=dtype) if with_bias else None
        kernel = "flash" if _cuda_flash_ok(q, bias) else "efficient"
        try:
            out, lse = _cuda_forward(q, k, v, D**-0.5, bias)
            expect("out", out, q.shape, dtype)
            expect("lse", lse, (B, H, Sq), torch.float32)
            grads = _cuda_backward(torch.empty_like(q), q, k, v, out, lse, D**-0.5, bias)[:3]
            for name, g, like in zip(("dq", "dk", "dv"), grads, (q, k, v), strict=True):
                expect(name, g, like.shape, dtype)
        except Exception as err:  # a wrong argument list: the op's schema or meta kernel refuses it
            problems.append(f"{type(err).__name__}: {err}")
    return dict(
        dtype=str(dtype).removeprefix("torch."),
        shape=(B, H, Sq, Sk, D),
        bias=with_bias,
        kernel=kernel,
        problems=problems,
    )


def model_step(device: torch.device, preset: str, layers: int, shape, steps: int) -> dict:
    """(b): forward+backward of the parallelized CogVideoXDiT at world size 1 (bf16 autocast on CUDA)."""
    T, H, W, L = shape
    cfg = CogVideoXConfig.preset(
        preset, num_layers=layers, sample_frames=1 + 4 * (T - 1), sample_height=H, sample_width=W
    )
    dims = ParallelDims(1, cp_size=1, model_parallel_size=1)
    mesh = dims.build_mesh(device.type)
    with torch.device("meta"):
        model = CogVideoXDiT(cfg)
    parallelize(model, dims, mesh)
    materialize(model, device, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, cfg.in_channels, H, W, generator=gen).to(device)
    txt = torch.randn(1, L, cfg.text_embed_dim, generator=gen).to(device)
    t = torch.tensor([500.0], device=device)
    on_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    times, loss = [], None
    for _ in range(steps + 1):  # the first is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, txt, t).float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    tokens = L + T * (H // cfg.patch_size) * (W // cfg.patch_size)
    step = statistics.median(times[1:])
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, mesh
    return dict(
        preset=preset,
        layers=layers,
        tokens=tokens,
        step=step,
        flops=step_flops(cfg, tokens, 1),
        loss=loss.item(),
        peak_gib=peak_mem,
        ok=bool(torch.isfinite(loss)),
    )


def default_job(device: torch.device, steps: int) -> dict:
    """(c): `cpdit-launch train` on one rank for a few steps (nccl on CUDA), with sampling and export."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "launch",
            "--nproc-per-node",
            "1",
            "train",
            f"train.output_dir={tmp}",
            "train.run_name=gpu",
            f"train.steps={steps}",
            f"dist.backend={backend}",
            "parallel.cp_size=1",
            "parallel.model_parallel_size=1",
            "sample.num_steps=2",
            "logging.wandb=false",
            f"checkpoint.every={steps}",
        ]
        env = {**os.environ, "WANDB_MODE": "offline"}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        run = Path(tmp) / "gpu"
        rows = (
            [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            if (run / "metrics.jsonl").is_file()
            else []
        )
        losses = [row["loss"] for row in rows if "loss" in row and "event" not in row]
        ok = r.returncode == 0 and len(losses) == steps and all(v == v for v in losses)
        ok = ok and any((run / "samples").glob("*.mp4")) and (run / "export" / "model.safetensors").is_file()
        return dict(
            backend=backend,
            rc=r.returncode,
            losses=losses,
            seconds=time.perf_counter() - t0,
            ok=ok,
            tail="" if ok else (r.stdout[-2000:] + r.stderr[-4000:]),
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check cpdit's CUDA paths on one device (or --dry-run on CPU).")
    p.add_argument("--dry-run", action="store_true", help="run every part on CPU at small shapes (gloo)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (bf16 dense)")
    p.add_argument(
        "--layers", type=int, default=2, help="blocks of the CogVideoX-size models (per-layer figures scale)"
    )
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"bench/gpu.py on {name}, torch {torch.__version__}")
    failures = 0

    if args.dry_run:
        print("\n(a0) CUDA kernel calls on fake CUDA tensors (argument lists, output shapes and dtypes)\n")
        print("| dtype | B,H,Sq,Sk,D | bias | kernel | ok |\n|---|---|---|---|---|")
        for case in FAKE_CASES:
            r = fake_cuda_kernel(*case)
            failures += bool(r["problems"])
            verdict = "; ".join(r["problems"]) or "fine"
            print(f"| {r['dtype']} | {','.join(map(str, r['shape']))} | {r['bias']} | {r['kernel']} | {verdict} |")
        dtypes, shapes = [torch.float32, torch.bfloat16], [(1, 2, 33, 47, 64)]
    else:
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        shapes = [(2, 4, 128, 256, 64), (1, 8, 333, 1350, 64), (1, 2, 77, 77, 128)]
    print("\n(a) attention kernels vs float64 (max |err| / max(|ref|, 1))\n")
    print("| dtype | B,H,Sq,Sk,D | bias | kernel | fwd err | bwd err | ok |\n|---|---|---|---|---|---|---|")
    for r in check_kernels(device, dtypes, shapes):
        failures += not r["ok"]
        print(
            f"| {r['dtype']} | {','.join(map(str, r['shape']))} | {r['bias']} | {r['kernel']} | {r['fwd']:.1e} | "
            f"{r['bwd']:.1e} | {'yes' if r['ok'] else 'NO'} |"
        )

    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"file://{store.name}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=600),
    )
    print(
        "\n(b) parallelized CogVideoXDiT, world size 1, forward+backward" + ("" if args.dry_run else ", bf16 autocast")
    )
    print(
        "\n| model | layers | tokens | step s | tokens/s | TFLOP/s | MFU | peak GiB | ok |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    cases = (
        [("tiny", 2, (3, 8, 8, 16))]
        if args.dry_run
        else [(m, args.layers, (13, 60, 90, 226)) for m in ("cogvideox-2b", "cogvideox-5b")]
    )
    for preset, layers, shape in cases:
        try:
            r = model_step(device, preset, layers, shape, args.steps)
        except Exception as err:  # a failure is a finding: report it and go on
            failures += 1
            print(f"| {preset} | {layers} | - | - | - | - | - | - | NO: {type(err).__name__}: {err} |")
            continue
        failures += not r["ok"]
        tflops = r["flops"] / r["step"] / 1e12
        mfu = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "n/a"
        print(
            f"| {preset} | {layers} | {r['tokens']} | {r['step']:.3f} | {r['tokens'] / r['step']:.0f} | "
            f"{tflops:.1f} | {mfu} | {r['peak_gib']:.1f} | {'yes' if r['ok'] else 'NO'} |"
        )
    dist.destroy_process_group()
    os.unlink(store.name)

    print("\n(c) the default job on one rank")
    r = default_job(device, args.steps)
    failures += not r["ok"]
    print(
        f"backend={r['backend']} exit={r['rc']} losses={[round(v, 4) for v in r['losses']]} "
        f"{r['seconds']:.0f} s: {'ok' if r['ok'] else 'FAILED'}"
    )
    if not r["ok"]:
        print(r["tail"])
    print(f"\n{failures} failure(s); {time.perf_counter() - started:.0f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
