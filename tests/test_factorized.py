# The factorized spatial/temporal family (SVD's SpatialVideoTransformer) under context parallelism: the
# frames <-> spatial-tokens all-to-all on its own (forward = the sharded full tensor, backward = its adjoint), and
# the whole transformer with frames split over 1, 2 and 4 real gloo ranks — uneven frames (5) and spatial tokens
# (6 on 4 ranks), contiguous and zigzag frame layouts — equal to the single-process model in float64: outputs,
# input gradients and every parameter gradient.
import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks
from parity_helpers import build_parallel, check_output_and_grads, dp_slice

from cpdit.models.factorized.layers import FactorizedConfig, SpatialVideoTransformer
from cpdit.partition import even_split
from cpdit.seams import LocalAxes
from parallel.axis_switch import AxisSwitch, CPAxes
from parallel.sequence import frame_partition

TOL = dict(rtol=1e-10, atol=1e-10)


def _frames(T, world, layout):
    return [[f for a, b in segs for f in range(a, b)] for segs in frame_partition(T, world, layout)]


def _switch(rank, world, layout):
    T, S, B, D = 5, 6, 2, 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, S, D, generator=gen, dtype=torch.float64)
    w = torch.randn(B, T, S, D, generator=gen, dtype=torch.float64)
    frames = _frames(T, world, layout)
    sw = AxisSwitch(frames, S, dist.group.WORLD)
    mine = torch.tensor(frames[rank])
    tok = slice(sum(even_split(S, world)[:rank]), sum(even_split(S, world)[: rank + 1]))
    x_local = x.index_select(1, mine).clone().requires_grad_()
    y = sw.frames_to_tokens(x_local)
    torch.testing.assert_close(y, x[:, :, tok], **TOL)
    (y * w[:, :, tok]).sum().backward()
    torch.testing.assert_close(x_local.grad, w.index_select(1, mine), **TOL)
    back = sw.tokens_to_frames(y)
    torch.testing.assert_close(back, x_local.detach(), **TOL)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_axis_switch_and_its_backward(world, layout, tmp_path):
    run_ranks(_switch, world, tmp_path, layout)


def _model(rank, world, layout, strategy):
    T, S, B, L = 5, 6, 2, 3
    torch.manual_seed(0)
    # learned strategies: temporal cross-attention to the text; fixed: sgm's default, a second temporal self-attention
    c = FactorizedConfig(
        in_channels=8,
        num_heads=2,
        head_dim=4,
        depth=2,
        temporal_blocks=1,
        context_dim=6,
        use_spatial_context=strategy != "fixed",
        merge_strategy=strategy,
        norm_groups=2,
    )
    model = SpatialVideoTransformer(c).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, S, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    per_frame = strategy == "learned"  # a context per frame (sgm's layout): each rank takes its frames' contexts
    ctx = torch.randn(B, *((T,) if per_frame else ()), L, 6, generator=gen, dtype=torch.float64)
    images = torch.zeros(B, T)
    images[1, 0] = 1  # the second video's first frame is an image
    w = torch.randn(B, T, S, 8, generator=gen, dtype=torch.float64)
    ref = model(x, ctx, images, LocalAxes())
    (ref * w).sum().backward()
    ref_gp = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    frames = _frames(T, world, layout)
    mine = torch.tensor(frames[rank])
    x_local = x.detach().index_select(1, mine).clone().requires_grad_()
    out = model(x_local, ctx, images, CPAxes(AxisSwitch(frames, S, dist.group.WORLD)))
    torch.testing.assert_close(out, ref.detach().index_select(1, mine), **TOL)
    (out * w.index_select(1, mine)).sum().backward()
    torch.testing.assert_close(x_local.grad, x.grad.index_select(1, mine), **TOL)
    for n, p in model.named_parameters():  # partial per rank (its frames); summed = the full gradient
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, ref_gp[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize(
    "world, layout, strategy",
    [
        (1, "contiguous", "learned_with_images"),
        (2, "contiguous", "learned"),
        (4, "contiguous", "learned_with_images"),
        (4, "zigzag", "fixed"),
    ],
)
def test_spatial_video_transformer_under_cp_equals_single_process(world, layout, strategy, tmp_path):
    run_ranks(_model, world, tmp_path, layout, strategy)


def _dit(rank, world, cp, layout, ac="none", tp=1, compile=False):
    from cpdit.models.factorized.model import FactorizedDiT, FactorizedDiTConfig

    c = FactorizedDiTConfig(
        text_embed_dim=8,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        time_embed_dim=16,
        norm_groups=4,
        ff_in=True,
    )
    ref = FactorizedDiT(c).double()
    ref.init_weights(3)
    gen = torch.Generator().manual_seed(2)
    B, T, H, W, L = 2, 5, 6, 6, 4  # 9 spatial tokens per frame: uneven on 2 and 4 ranks
    x = torch.randn(B, T, 3, H, W, generator=gen, dtype=torch.float64)
    txt = torch.randn(B, L, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([10.0, 700.0], dtype=torch.float64)
    w = torch.randn(B, T, 3, H, W, generator=gen, dtype=torch.float64)
    out_ref = ref(x, txt, t)
    (out_ref * w).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    model, dims, mesh = build_parallel(
        FactorizedDiT, c, world, cp, tp, layout=layout, ac=ac, compile=compile
    )  # axis switching
    mine = dp_slice(dims, rank, B)
    out = model(x[mine], txt[mine], t[mine], return_local=True)
    bound = model.sequence.bind(T, (H // 2) * (W // 2), L)
    check_output_and_grads(model, dims, bound, out, out_ref[mine], w[mine], ref_grads)
    del mesh


@pytest.mark.parametrize(
    "world, cp, tp, layout, ac",
    [
        (2, 2, 1, "contiguous", "full"),
        (4, 4, 1, "zigzag", "none"),
        (4, 2, 1, "contiguous", "none"),
        (4, 2, 2, "contiguous", "none"),
        (2, 1, 2, "contiguous", "none"),
    ],
)
def test_factorized_dit_parallelized_equals_single_process(world, cp, tp, layout, ac, tmp_path):
    """The svd-like diffusion model through parallelize: FSDP2 over dp x cp, frames over cp with axis switching,
    heads and feed-forward columns over tp, per-stage activation checkpointing."""
    run_ranks(_dit, world, tmp_path, cp, layout, ac, tp)


@pytest.mark.slow  # inductor compiles the blocks
def test_factorized_dit_compiled_equals_single_process(tmp_path):
    """Compiled blocks (train.compile): the axis switches are graph breaks; dp=2 x cp=2."""
    run_ranks(_dit, 4, tmp_path, 2, "contiguous", "none", 1, True, timeout=900)


@pytest.mark.slow
def test_svd_like_preset_trains_with_the_job(tmp_path):
    """cpdit-launch train model.preset=svd-like on the default layout: 4 ranks, cp=2 (axis switching) x tp=2, FSDP,
    samples written."""
    from job_helpers import launch, losses

    launch(
        tmp_path,
        "svd",
        "model.preset=svd-like",
        "train.steps=4",
        "checkpoint.every=2",
        "data.num_samples=8",
        "logging.wandb=false",
        "sample.num_steps=2",
        "sample.prompts=[a red circle moving left]",
    )
    by_step, rows = losses(tmp_path / "svd")
    assert sorted(by_step) == [1, 2, 3, 4] and all(v == v for v in by_step.values())
    assert "cp=2" in rows[0]["layout"] and "tp=2" in rows[0]["layout"]
    assert list((tmp_path / "svd" / "samples").glob("*.mp4"))
    assert (tmp_path / "svd" / "export" / "model.safetensors").is_file()
