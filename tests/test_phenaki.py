# The Phenaki family under context parallelism: frame windows for the causal PEG on their own (forward = the padded
# full tensor, backward = its adjoint), and the whole PhenakiDiT through parallelize — frames over cp (ring, Ulysses,
# contiguous and zigzag, 5 frames uneven on 2 and 4 ranks), heads over tp, FSDP2, activation checkpointing — equal
# to the single-process model in float64: outputs and every parameter gradient (ALiBi + continuous position bias
# MLP, null keys/values, q/k scales, PEG), with per-frame timesteps, a text padding mask and a padded clip.
import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks
from parity_helpers import build_parallel, check_output_and_grads, dp_slice

from cpdit.models.phenaki.model import PhenakiDiT, PhenakiDiTConfig
from parallel.frame_halo import FrameWindows
from parallel.sequence import frame_partition

TOL = dict(rtol=1e-10, atol=1e-10)


def _windows(rank, world, layout, before, after):
    T, B = 7, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 3, generator=gen, dtype=torch.float64)
    segs = frame_partition(T, world, layout)
    mine = torch.tensor([f for a, b in segs[rank] for f in range(a, b)])
    padded = torch.cat([torch.zeros(B, before, 3, dtype=x.dtype), x, torch.zeros(B, after, 3, dtype=x.dtype)], 1)
    group = dist.group.WORLD if world > 1 else None
    x_local = x.index_select(1, mine).clone().requires_grad_()
    wins = FrameWindows(segs, rank, group, before, after)(x_local)
    total = torch.zeros((), dtype=x.dtype)
    w = torch.randn(B, T + before + after, 3, generator=gen, dtype=torch.float64)
    for (a, b), win in zip(segs[rank], wins, strict=True):
        torch.testing.assert_close(win, padded[:, a : b + before + after], **TOL)
        total = total + (win * w[:, a : b + before + after]).sum()
    total.backward()
    # adjoint: the full gradient of sum over every rank's windows, at this rank's frames
    full = torch.zeros(B, T + before + after, 3, dtype=x.dtype)
    for segs_r in segs:
        for a, b in segs_r:
            full[:, a : b + before + after] += w[:, a : b + before + after]
    torch.testing.assert_close(x_local.grad, full[:, before : before + T].index_select(1, mine), **TOL)


@pytest.mark.parametrize(
    "world, layout, before, after",
    [(1, "contiguous", 2, 0), (2, "zigzag", 2, 0), (4, "contiguous", 2, 0), (4, "zigzag", 1, 1)],
)
def test_frame_windows_and_their_backward(world, layout, before, after, tmp_path):
    run_ranks(_windows, world, tmp_path, layout, before, after)


def _config(**kw) -> PhenakiDiTConfig:
    return PhenakiDiTConfig(
        text_embed_dim=8,
        num_attention_heads=6,
        attention_head_dim=4,
        num_layers=2,
        time_embed_dim=16,
        cpb_dim=8,
        self_attn_null_kv=2,
        **kw,
    )


def _inputs():
    gen = torch.Generator().manual_seed(2)
    B, T, H, W, L = 2, 5, 6, 6, 4  # 9 tokens per frame
    x = torch.randn(B, T, 3, H, W, generator=gen, dtype=torch.float64)
    txt = torch.randn(B, L, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 300.0, 999.0, 999.0], [10.0, 200.0, 400.0, 600.0, 800.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * L, [True, True, False, False]])
    lengths = torch.tensor([5, 4])  # the second clip has one padding frame
    w = torch.randn(B, T, 3, H, W, generator=gen, dtype=torch.float64)
    return x, txt, t, mask, lengths, w


def test_phenaki_dit_is_frame_causal():
    model = PhenakiDiT(_config()).double()
    model.init_weights(1)
    x, txt, t, mask, lengths, _ = _inputs()
    out = model(x, txt, t, text_mask=mask, frame_lengths=lengths)
    x2, t2 = x.clone(), t.clone()
    x2[:, 3:] += 1.0
    t2[:, 3:] = 5.0
    out2 = model(x2, txt, t2, text_mask=mask, frame_lengths=lengths)
    assert torch.equal(out[:, :3], out2[:, :3])  # frames 0..2 do not see frames 3..4
    assert (out[:, 3:] - out2[:, 3:]).abs().max() > 1e-3


def _dit(rank, world, cp, tp, layout, attention, ac, compile=False):
    c = _config()
    ref = PhenakiDiT(c).double()
    ref.init_weights(3)
    x, txt, t, mask, lengths, w = _inputs()
    out_ref = ref(x, txt, t, text_mask=mask, frame_lengths=lengths)
    (out_ref * w).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    model, dims, mesh = build_parallel(
        PhenakiDiT, c, world, cp, tp, layout=layout, attention=attention, ac=ac, compile=compile
    )
    mine = dp_slice(dims, rank, x.shape[0])
    out = model(x[mine], txt[mine], t[mine], return_local=True, text_mask=mask[mine], frame_lengths=lengths[mine])
    bound = model.sequence.bind(x.shape[1], 9, 0)
    check_output_and_grads(model, dims, bound, out, out_ref[mine], w[mine], ref_grads)
    del mesh


@pytest.mark.parametrize(
    "world, cp, tp, layout, attention, ac",
    [
        (2, 2, 1, "contiguous", "ring", "full"),
        (4, 4, 1, "zigzag", "ring", "none"),
        (4, 2, 2, "zigzag", "ulysses", "none"),
        (2, 1, 2, "contiguous", "auto", "none"),
        (4, 4, 1, "contiguous", "allgather", "none"),
    ],
)
def test_phenaki_dit_parallelized_equals_single_process(world, cp, tp, layout, attention, ac, tmp_path):
    run_ranks(_dit, world, tmp_path, cp, tp, layout, attention, ac)


@pytest.mark.slow  # inductor compiles the blocks
def test_phenaki_dit_compiled_equals_single_process(tmp_path):
    """Compiled blocks (train.compile): biased, frame-causal ring attention and the frame windows are graph
    breaks; cp=4, zigzag."""
    run_ranks(_dit, 4, tmp_path, 4, 1, "zigzag", "ring", "none", True, timeout=900)


@pytest.mark.slow
def test_phenaki_like_preset_trains_with_the_job(tmp_path):
    """cpdit-launch train model.preset=phenaki-like on the default layout: 4 ranks, cp=2 (ring with the bias) x
    tp=2, FSDP, per-frame noise levels; sampling generates the frames in order."""
    from job_helpers import launch, losses

    launch(
        tmp_path,
        "phenaki",
        "model.preset=phenaki-like",
        "train.steps=4",
        "checkpoint.every=2",
        "data.num_samples=8",
        "logging.wandb=false",
        "sample.num_steps=2",
        "sample.prompts=[a red circle moving left]",
    )
    by_step, rows = losses(tmp_path / "phenaki")
    assert sorted(by_step) == [1, 2, 3, 4] and all(v == v for v in by_step.values())
    assert "cp=2" in rows[0]["layout"] and "tp=2" in rows[0]["layout"]
    assert list((tmp_path / "phenaki" / "samples").glob("*.mp4"))


def test_frames_are_sampled_in_order():
    """sample_frames_in_order with a frame-causal model: frame t does not depend on the noise of later frames, and
    every frame is denoised (differs from its noise)."""
    from cpdit.diffusion import Schedule, sample_frames_in_order

    model = PhenakiDiT(_config()).double()
    model.init_weights(1)
    txt = torch.randn(1, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 3, 6, 6, generator=gen, dtype=torch.float64)
    other = noise.clone()
    other[:, 2:] = torch.randn(1, 2, 3, 6, 6, generator=gen, dtype=torch.float64)
    calls = []

    def denoise(x, idx):
        calls.append(idx.clone())
        return model(x, txt, idx.double())

    schedule = Schedule.zero_snr(1000)
    a = sample_frames_in_order(denoise, noise, schedule, 3)
    b = sample_frames_in_order(denoise, other, schedule, 3)
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.equal(a[:, 2:], b[:, 2:])
    assert all((a[:, t] - noise[:, t]).abs().max() > 1e-3 for t in range(4))
    # frame 1's steps: frame 0 fixed (timestep 0), frames 2.. pure noise (the last timestep)
    first_of_frame1 = calls[3]
    assert first_of_frame1[0, 0] == 0 and first_of_frame1[0, 2] == 999 and first_of_frame1[0, 3] == 999
