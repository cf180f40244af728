# Benchmark of the CogVideoX causal 3D VAE: encode and decode time and per-rank peak memory with the frames split
# over cp ranks (real gloo processes), against one device, whole clip and exactly streamed in chunks.
#
#   python bench/vae.py                          # mid config, 49 frames at 64x64, cp 1/2/4, streamed x2
#   python bench/vae.py --frames 97 --size 96    # a longer clip
#
# Peak memory is the rise of VmHWM (peak RSS) over the RSS before the call, per rank, max over ranks
# (glibc is told to mmap large blocks so RSS follows live memory, bench/common.py). Every row encodes the same
# clip and decodes the same latents; the outputs are checked against cp=1 before timing is reported.
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import MALLOC_ENV, reset_peak, rss_bytes  # noqa: E402

from cpdit.vae import CogVideoXVAE, LocalTime, VAEConfig  # noqa: E402
from launch.spawn import spawn_ranks  # noqa: E402
from parallel.vae import CPTime, gather_time, latent_partition, pixel_partition, shard_time  # noqa: E402

CONFIGS = {
    "tiny": VAEConfig.preset("tiny"),
    # a quarter of CogVideoX's width, same depth and compression (8x space, 4x time)
    "mid": VAEConfig(block_out_channels=(32, 64, 64, 128), layers_per_block=2, norm_num_groups=16),
}


def _measure(fn, repeats: int) -> tuple[float, int, torch.Tensor]:
    out = fn()  # warm-up
    del out
    gc.collect()
    base = rss_bytes()
    reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rss_bytes("VmHWM") - base, out


def _worker(rank, world, name, frames, size, chunk, repeats, result):
    torch.manual_seed(0)
    vae = CogVideoXVAE(CONFIGS[name]).eval().requires_grad_(False)
    c = vae.config
    latents = c.latent_frames(frames)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, frames, size, size, generator=gen) * 2 - 1
    z = torch.randn(1, c.latent_channels, latents, size // c.spatial_factor, size // c.spatial_factor, generator=gen)
    lat = latent_partition(latents, world)
    pix = pixel_partition(lat, c.temporal_compression_ratio)
    group = dist.group.WORLD
    if world == 1:
        t_in, t_lat = LocalTime(), LocalTime()
    else:
        t_in, t_lat = CPTime(group, pix), CPTime(group, lat)
    x_local = shard_time(x, pix, rank).contiguous()
    z_local = shard_time(z, lat, rank).contiguous()
    with torch.no_grad():
        if chunk:  # exact streaming on one device (cpdit/vae/streaming.py)
            enc_s, enc_peak, m = _measure(lambda: vae.encode_chunked(x, chunk).mean, repeats)
            dec_s, dec_peak, y = _measure(lambda: vae.decode_chunked(z, chunk), repeats)
            m = torch.cat([m, m], dim=1)  # compared as moments below: mean only, duplicated to the moments' width
        else:
            enc_s, enc_peak, m = _measure(lambda: vae.encoder(x_local, t_in), repeats)
            dec_s, dec_peak, y = _measure(lambda: vae.decoder(z_local, t_lat), repeats)
        m, y = gather_time(m, lat, group), gather_time(y, pix, group)
    row = dict(
        config=name,
        frames=frames,
        size=size,
        cp=world,
        chunk=chunk,
        enc=enc_s,
        dec=dec_s,
        enc_peak=enc_peak,
        dec_peak=dec_peak,
    )
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        merged = dict(row, **{k: max(r[k] for r in rows) for k in ("enc", "dec", "enc_peak", "dec_peak")})
        torch.save({"m": m, "y": y}, str(Path(result).with_suffix(".pt")))
        Path(result).write_text(json.dumps(merged))


def run(name, frames, size, cp, chunk, repeats) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        spawn_ranks(_worker, cp, name, frames, size, chunk, repeats, str(result), directory=tmp)
        return json.loads(result.read_text()), torch.load(str(result.with_suffix(".pt")), weights_only=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Benchmark the context-parallel CogVideoX VAE.")
    p.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--cp", default="1,2,4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunks", default="2", help="latent frames per chunk for exact streaming on one device")
    p.add_argument("--json", default=None, help="write the raw rows (times, peaks, errors) here")
    args = p.parse_args(argv)
    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)
    rows, ref = [], None
    layouts = [(int(v), 0) for v in args.cp.split(",")]
    layouts[1:1] = [(1, int(v)) for v in args.chunks.split(",") if v and v != "0"]
    for cp, chunk in layouts:
        row, out = run(args.config, args.frames, args.size, cp, chunk, args.repeats)
        if ref is None:
            ref = out
        width = ref["m"].shape[1] // 2
        row["max_err"] = max(
            (out["m"][:, :width] - ref["m"][:, :width]).abs().max().item(), (out["y"] - ref["y"]).abs().max().item()
        )
        rows.append(row)
    c = CONFIGS[args.config]
    print(
        f"\nCogVideoX VAE ({args.config}: widths {c.block_out_channels}, {c.layers_per_block} resnets/level), "
        f"{args.frames} frames {args.size}x{args.size}, fp32, 1 thread/rank, torch {torch.__version__}"
    )
    print(
        "| layout | encode s | speedup | decode s | speedup | encode peak MiB/rank | decode peak MiB/rank "
        "| max abs diff vs cp=1 |"
    )
    print("|" + "---|" * 8)
    b = rows[0]
    for r in rows:
        layout = f"cp={r['cp']}" + (f", streamed {r['chunk']} latents/chunk" if r["chunk"] else "")
        print(
            f"| {layout} | {r['enc']:.2f} | {b['enc'] / r['enc']:.2f}x | {r['dec']:.2f} | {b['dec'] / r['dec']:.2f}x | "
            f"{r['enc_peak'] / 2**20:.0f} ({r['enc_peak'] / b['enc_peak']:.2f}x) | "
            f"{r['dec_peak'] / 2**20:.0f} ({r['dec_peak'] / b['dec_peak']:.2f}x) | {r['max_err']:.1e} |"
        )
    if args.json:
        raw = dict(measured=time.strftime("%Y-%m-%d"), torch=torch.__version__, args=vars(args), rows=rows)
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
