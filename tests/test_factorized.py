# The factorized spatial/temporal family (SVD's SpatialVideoTransformer) under context parallelism: the
# frames <-> spatial-tokens all-to-all on its own (forward = the sharded full tensor, backward = its adjoint), and
# the whole transformer with frames split over 1, 2 and 4 real gloo ranks — uneven frames (5) and spatial tokens
# (6 on 4 ranks), contiguous and zigzag frame layouts — equal to the single-process model in float64: outputs,
# input gradients and every parameter gradient.
import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks

from cpdit.factorized import FactorizedConfig, LocalAxes, SpatialVideoTransformer
from parallel.axis_switch import AxisSwitch, SwitchAxes, split_sizes
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
    tok = slice(sum(split_sizes(S, world)[:rank]), sum(split_sizes(S, world)[: rank + 1]))
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
    c = FactorizedConfig(in_channels=8, num_heads=2, head_dim=4, depth=2, time_depth=1, context_dim=6,
                         merge_strategy=strategy, ff_in=True, norm_groups=2)  # fmt: skip
    model = SpatialVideoTransformer(c).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, S, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(B, L, 6, generator=gen, dtype=torch.float64)
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
    out = model(x_local, ctx, images, SwitchAxes(AxisSwitch(frames, S, dist.group.WORLD)))
    torch.testing.assert_close(out, ref.detach().index_select(1, mine), **TOL)
    (out * w.index_select(1, mine)).sum().backward()
    torch.testing.assert_close(x_local.grad, x.grad.index_select(1, mine), **TOL)
    for n, p in model.named_parameters():  # partial per rank (its frames); summed = the full gradient
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, ref_gp[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize(
    "world, layout, strategy",
    [(1, "contiguous", "learned_with_images"), (2, "contiguous", "learned"), (4, "contiguous", "learned_with_images"),
     (4, "zigzag", "fixed")],
)  # fmt: skip
def test_spatial_video_transformer_under_cp_equals_single_process(world, layout, strategy, tmp_path):
    run_ranks(_model, world, tmp_path, layout, strategy)
