# The CogVideoX causal 3D VAE: parity with diffusers' AutoencoderKLCogVideoX (weights key for key, random tiny
# model, fp32), and context parallelism: encode and decode with the frames split over 1, 2 and 4 real gloo ranks
# (uneven, 49 frames on 4 ranks, shards of one latent frame that need halos from two ranks back) equal the
# single-process model, outputs and input/parameter gradients, in float64.
import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks

from cpdit.vae import CogVideoXVAE, LocalTime, VAEConfig
from cpdit.vae.convert import load_vae, save_vae
from parallel.vae import CPTime, latent_partition, pixel_partition, shard_time


def tiny(seed: int = 0, dtype=torch.float64) -> CogVideoXVAE:
    torch.manual_seed(seed)
    vae = CogVideoXVAE(VAEConfig.preset("tiny")).to(dtype)
    with torch.no_grad():  # non-trivial norms (diffusers initialises them to 1 and 0)
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return vae


def diffusers_twin(vae: CogVideoXVAE):
    diffusers = pytest.importorskip("diffusers")
    c = vae.config
    ref = diffusers.AutoencoderKLCogVideoX(
        latent_channels=c.latent_channels,
        block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        down_block_types=("CogVideoXDownBlock3D",) * len(c.block_out_channels),
        up_block_types=("CogVideoXUpBlock3D",) * len(c.block_out_channels),
        temporal_compression_ratio=c.temporal_compression_ratio,
    )
    ref.load_state_dict(vae.state_dict(), strict=True)
    return ref.eval()


def test_matches_diffusers_and_loads_its_checkpoints(tmp_path):
    vae = tiny(dtype=torch.float32)
    ref = diffusers_twin(vae)
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    z = torch.randn(2, 4, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).mean, ref.encode(x).latent_dist.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(z), ref.decode(z).sample, rtol=1e-5, atol=1e-5)
    ref.save_pretrained(tmp_path / "vae")  # config.json + diffusion_pytorch_model.safetensors
    loaded = load_vae(tmp_path / "vae")
    assert loaded.config.block_out_channels == (8, 16, 16) and loaded.config.latent_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), ref.decode(z).sample, rtol=1e-5, atol=1e-5)
    save_vae(loaded, tmp_path / "ours")
    again = diffusers_twin(load_vae(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z).sample, ref.decode(z).sample, rtol=0, atol=0)


def test_frame_rule():
    c = VAEConfig.preset("cogvideox")
    assert c.latent_frames(49) == 13
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        c.latent_frames(48)
    assert latent_partition(13, 4) == [4, 3, 3, 3] and pixel_partition([4, 3, 3, 3], 4) == [13, 12, 12, 12]


def test_49_frames_both_semantics_against_diffusers():
    """At CogVideoX's 49 frames / 13 latents, float64: `encode_diffusers`/`decode_diffusers` equal diffusers'
    AutoencoderKLCogVideoX as shipped (8-frame and 2-latent batches, GroupNorm statistics per batch); cpdit's default
    (whole-clip statistics, CogVideoX's context-parallel semantics) equals diffusers with batches that cover the
    clip, and differs from the batched one by far more than rounding. (diffusers run in float64 still rounds somewhere
    to float32: even the whole-clip comparison agrees to ~1e-7, not 1e-12; hence 1e-6.)"""
    vae = tiny()
    ref = diffusers_twin(vae).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 49, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 4, 13, 4, 4, generator=gen, dtype=torch.float64)
    f64 = dict(rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        batched_enc, batched_dec = ref.encode(x).latent_dist.mean, ref.decode(z).sample
        torch.testing.assert_close(vae.encode_diffusers(x).mean, batched_enc, **f64)
        torch.testing.assert_close(vae.decode_diffusers(z), batched_dec, **f64)
        whole_enc, whole_dec = vae.encode(x).mean, vae.decode(z)
        assert (whole_enc - batched_enc).abs().max() > 1e-2 and (whole_dec - batched_dec).abs().max() > 1e-2
        ref.num_sample_frames_batch_size, ref.num_latent_frames_batch_size = 64, 16  # one batch: the whole clip
        torch.testing.assert_close(whole_enc, ref.encode(x).latent_dist.mean, **f64)
        torch.testing.assert_close(whole_dec, ref.decode(z).sample, **f64)
    from cpdit.first_stage import VAEStage  # first_stage.semantics=diffusers

    stage = VAEStage(vae, 1.0, diffusers_batches=True)
    mean, _ = stage.moments(x.permute(0, 2, 1, 3, 4))
    torch.testing.assert_close(mean, batched_enc, **f64)
    torch.testing.assert_close(
        stage.decode(z.permute(0, 2, 1, 3, 4)), batched_dec.clamp(-1, 1).permute(0, 2, 1, 3, 4), **f64
    )


@pytest.mark.parametrize("frames, decoded", [(9, 9), (17, 17), (13, 16), (5, 8)])
def test_round_trip_keeps_the_length_only_for_odd_latent_counts(frames, decoded):
    """What the launcher's frame rule (1 + 8k with 4x time compression) rests on: an even latent count decodes to 4T
    frames (tests/test_bad_inputs.py checks the refusal)."""
    vae = tiny()
    assert vae.config.temporal_compression_ratio == 4
    x = torch.randn(1, 3, frames, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = vae.encode(x, LocalTime()).mean
        assert z.shape[2] == 1 + (frames - 1) // 4
        assert vae.decode(z, LocalTime()).shape[2] == decoded


def _cp_parity(rank, world, latents, which):
    torch.manual_seed(0)
    vae = tiny()
    group = dist.group.WORLD
    lat = latent_partition(latents, world)
    frames = 1 + 4 * (latents - 1)
    gen = torch.Generator().manual_seed(1)
    if which == "encode":
        x = (torch.rand(1, 3, frames, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
        out = vae.encoder(x, LocalTime())
        counts_in, counts_out = pixel_partition(lat, 4), lat
    else:
        x = torch.randn(1, 4, latents, 2, 2, generator=gen, dtype=torch.float64).requires_grad_()
        out = vae.decoder(x, LocalTime())
        counts_in, counts_out = lat, pixel_partition(lat, 4)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * w).sum().backward()
    ref_out, ref_gx = out.detach(), x.grad
    part = vae.encoder if which == "encode" else vae.decoder
    ref_gp = {n: p.grad.clone() for n, p in part.named_parameters()}
    vae.zero_grad()

    x_local = shard_time(x.detach(), counts_in, rank).clone().requires_grad_()
    t = CPTime(group, counts_in)
    out_local = vae.encoder(x_local, t) if which == "encode" else vae.decoder(x_local, t)
    torch.testing.assert_close(out_local, shard_time(ref_out, counts_out, rank), rtol=1e-10, atol=1e-10)
    (out_local * shard_time(w, counts_out, rank)).sum().backward()
    torch.testing.assert_close(x_local.grad, shard_time(ref_gx, counts_in, rank), rtol=1e-10, atol=1e-10)
    for n, p in part.named_parameters():  # each rank holds the gradient of its frames; the sum is the full one
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, ref_gp[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("world, latents", [(1, 3), (2, 3), (4, 5), (4, 13)])
@pytest.mark.parametrize("which", ["encode", "decode"])
def test_context_parallel_equals_single_process(world, latents, which, tmp_path):
    """(4, 5): latent shards 2,1,1,1 need halos from two ranks back; (4, 13): 49 frames on 4 ranks."""
    run_ranks(_cp_parity, world, tmp_path, latents, which)


def _stage_parity(rank, world):
    from cpdit.first_stage import VAEStage
    from parallel.vae_stage import ContextParallelVAE

    vae = tiny(dtype=torch.float32)
    local = VAEStage(vae, scale_factor=0.7)
    cp = ContextParallelVAE(local, dist.group.WORLD)
    video = torch.rand(2, 13, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (B, F, 3, H, W)
    z_ref = local.encode(video, torch.Generator().manual_seed(5))
    z = cp.encode(video, torch.Generator().manual_seed(5))
    assert z.shape == (2, 4, 4, 4, 4)  # (B, T, C, h, w): 13 frames -> 4 latent frames
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cp.decode(z), local.decode(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_first_stage_context_parallel_equals_single_device(world, tmp_path):
    run_ranks(_stage_parity, world, tmp_path)


@pytest.mark.slow
def test_training_job_on_vae_latents_with_and_without_the_latent_cache(tmp_path):
    """The job with the frozen VAE as first stage, encoding and decoding under cp=2 (9 frames -> 3 latents). With
    4 clips and batches of 2, step 3 starts the second epoch: its clips come from the latent cache, and the losses
    equal those of the run without a cache."""
    import imageio.v2 as imageio
    from job_helpers import launch, losses

    common = [
        "first_stage.kind=vae",
        "data.num_frames=9",
        "data.height=32",
        "data.width=32",
        "train.steps=3",
        "data.num_samples=4",
        "logging.wandb=false",
        "train.export=false",
        "sample.num_steps=2",
        "sample.prompts=[a red circle moving left]",
    ]
    launch(tmp_path, "vae", *common)
    launch(tmp_path, "cached", *common, f"data.latent_cache_dir={tmp_path / 'latents'}", "sample.at_end=false")
    plain, _ = losses(tmp_path / "vae")
    cached, rows = losses(tmp_path / "cached")
    assert sorted(plain) == [1, 2, 3] and all(v == v for v in plain.values())
    for step in (1, 2, 3):
        assert cached[step] == pytest.approx(plain[step], rel=1e-6)
    hits = {r["step"]: r["latent_cache_hits"] for r in rows if "latent_cache_hits" in r}
    assert hits[2] == 0 and hits[3] == 2  # epoch 2 read both clips of its first batch from the cache
    assert len(list((tmp_path / "latents").glob("*.safetensors"))) == 4
    frames = imageio.mimread(str(next((tmp_path / "vae" / "samples").glob("*.mp4"))))
    assert len(frames) == 9  # decoded by the VAE under cp: 3 latent frames -> 9


@pytest.mark.parametrize("per_chunk", [1, 2, 3])
def test_streamed_chunks_equal_the_whole_clip(per_chunk):
    """Frame-chunked encode/decode on one device (one chunk of activations at a time, a carried causal-conv cache,
    GroupNorm statistics of the whole clip from one pass per norm) equals the unchunked VAE."""
    vae = tiny().eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 21, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1  # 6 latent frames
    z = torch.randn(1, 4, 5, 4, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_chunked(x, per_chunk).mean, vae.encode(x).mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vae.decode_chunked(z, per_chunk), vae.decode(z), rtol=1e-12, atol=1e-12)
