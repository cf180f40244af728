# cpdit's factorized and Phenaki modules against the code they come from (the seeds, loaded at test time by
# tests/seed_modules.py; skipped where ../shared/seeds is absent): the seed module is built with random weights, its
# state dict goes through the family's converter (cpdit/models/*/convert.py) into cpdit's module, and outputs, input
# gradients and every parameter gradient (the seed's gradients through the same converter) agree in float64.
#
# The grid includes every case the families once got wrong: Phenaki keys/values from the un-normed input, null keys
# normalised and scaled, ALiBi on the null keys, non-causal self-attention, separate null counts; SVD's ff_in
# always on, the temporal attn2 as a second self-attention without a temporal context, time_depth unused, attn2
# without a text context, disable_self_attn, a context per frame and a separate time context.
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from seed_modules import phenaki_namespace, sgm_namespace

from cpdit.attn_bias import AttentionBias, ContinuousPositionBias, relative_index, video_positions
from cpdit.models.factorized.convert import svd_to_cpdit
from cpdit.models.factorized.layers import FactorizedConfig, SpatialVideoTransformer
from cpdit.models.phenaki.convert import phenaki_attention_to_cpdit, phenaki_cpb_to_cpdit, phenaki_transformer_to_cpdit
from cpdit.models.phenaki.layers import Attention, PhenakiBlock
from cpdit.models.seed_weights import SeedKeyError, load_strict
from cpdit.sequence import LocalSequence

F64 = dict(rtol=1e-10, atol=1e-10)
ERRORS: dict[str, float] = {}  # case -> max abs error over outputs and gradients (printed by -s)


@pytest.fixture(scope="module")
def sgm():
    return sgm_namespace()


@pytest.fixture(scope="module")
def phenaki():
    return phenaki_namespace()


def _randomize(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        for name, b in module.named_buffers():
            if name.endswith("mix_factor"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype))


def _compare(case: str, pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    worst = 0.0
    for what, mine, ref in pairs:
        torch.testing.assert_close(mine, ref, **F64, msg=lambda m, w=what: f"{case}: {w}: {m}")
        worst = max(worst, (mine - ref).abs().max().item())
    ERRORS[case] = worst
    print(f"{case}: max abs error {worst:.1e}")


def _param_grads(seed_module: nn.Module, convert, cpdit_module: nn.Module):
    """(name, cpdit grad, converted seed grad) for every cpdit parameter."""
    grads = {n: p.grad for n, p in seed_module.named_parameters() if p.grad is not None}
    state = {n: t for n, t in seed_module.state_dict().items()}
    state.update({n: torch.zeros_like(t) for n, t in state.items() if n not in grads})  # no gradient: zero
    state.update(grads)
    want = convert(state)
    return [
        (f"d{n}", p.grad if p.grad is not None else torch.zeros_like(p), want[n])
        for n, p in cpdit_module.named_parameters()
    ]


# --- sgm SpatialVideoTransformer ---------------------------------------------------------------------------------

B, T, HW, L = 2, 4, (2, 3), 3
SVD_CASES = {  # name: (seed kwargs, cpdit overrides, inputs: per-frame context / time context)
    "linear, learned_with_images, spatial context": (
        dict(use_linear=True, merge_strategy="learned_with_images", use_spatial_context=True, context_dim=16),
        {},
        {},
    ),
    "1x1 conv projections": (
        dict(use_linear=False, merge_strategy="learned", use_spatial_context=True, context_dim=16),
        {},
        {},
    ),
    "depth 2, fixed merge": (
        dict(
            use_linear=True, depth=2, merge_strategy="fixed", merge_factor=0.3, use_spatial_context=True, context_dim=16
        ),
        {},
        {},
    ),
    "no spatial context: temporal attn2 is self-attention": (dict(use_linear=True, context_dim=16), {}, {}),
    "no text context at all": (dict(use_linear=True), {}, {}),
    "disable_temporal_crossattention": (
        dict(use_linear=True, context_dim=16, use_spatial_context=True, disable_temporal_crossattention=True),
        {},
        {},
    ),
    "time_depth 3 is unused (one temporal block)": (
        dict(use_linear=True, context_dim=16, use_spatial_context=True, time_depth=3),
        {},
        {},
    ),
    "ff_in=False still has ff_in": (
        dict(use_linear=True, context_dim=16, use_spatial_context=True, ff_in=False),
        {},
        {},
    ),
    "disable_self_attn": (
        dict(use_linear=True, context_dim=16, use_spatial_context=True, disable_self_attn=True),
        {},
        {},
    ),
    "a context per frame": (dict(use_linear=True, context_dim=16, use_spatial_context=True), {}, {"per_frame": True}),
    "separate time context": (
        dict(use_linear=True, context_dim=16, time_context_dim=12),
        {"time_context_dim": 12},
        {"time_context": True},
    ),
    "max_time_embed_period 100": (
        dict(use_linear=True, context_dim=16, max_time_embed_period=100),
        {"max_time_embed_period": 100.0},
        {},
    ),
}


def _cpdit_svd_config(kw: dict, extra: dict) -> FactorizedConfig:
    return FactorizedConfig(
        in_channels=32,
        num_heads=4,
        head_dim=8,
        depth=kw.get("depth", 1),
        context_dim=kw.get("context_dim"),
        merge_strategy=kw.get("merge_strategy", "fixed"),
        merge_factor=kw.get("merge_factor", 0.5),
        use_spatial_context=kw.get("use_spatial_context", False),
        disable_temporal_crossattention=kw.get("disable_temporal_crossattention", False),
        disable_self_attn=kw.get("disable_self_attn", False),
        **extra,
    )


@pytest.mark.parametrize("case", list(SVD_CASES))
def test_svd_spatial_video_transformer_equals_sgm(sgm, case):
    kw, extra, inputs = SVD_CASES[case]
    torch.manual_seed(0)
    seed = sgm["SpatialVideoTransformer"](32, 4, 8, timesteps=T, **kw).double()
    seed.dtype = torch.float64  # the dtype sgm computes the time embedding in (its `dtype` knob knows fp32/16/bf16)
    _randomize(seed, 1)
    mine = SpatialVideoTransformer(_cpdit_svd_config(kw, extra)).double()
    load_strict(mine, svd_to_cpdit(seed.state_dict()))

    gen = torch.Generator().manual_seed(2)
    h, w = HW
    x = torch.randn(B * T, 32, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    cdim = kw.get("context_dim")
    ctx = None
    if cdim:
        shape = (B, T, L, cdim) if inputs.get("per_frame") else (B, 1, L, cdim)
        ctx = torch.randn(shape, generator=gen, dtype=torch.float64).expand(B, T, L, cdim).contiguous()
        ctx.requires_grad_()
    tctx = (
        torch.randn(B, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
        if "time_context" in inputs
        else None
    )
    images = torch.zeros(B, T, dtype=torch.float64)
    images[1, 0] = 1.0  # the second clip's first frame is an image
    g = torch.randn(B * T, 32, h, w, generator=gen, dtype=torch.float64)

    ref = seed(
        x,
        context=None if ctx is None else ctx.flatten(0, 1),
        time_context=tctx,
        timesteps=T,
        image_only_indicator=images,
    )
    ref.backward(g)

    x2 = x.detach().reshape(B, T, 32, h * w).transpose(2, 3).contiguous().requires_grad_()
    my_ctx = None if ctx is None else (ctx.detach().clone() if inputs.get("per_frame") else ctx.detach()[:, 0])
    if my_ctx is not None:
        my_ctx.requires_grad_()
    my_t = None if tctx is None else tctx.detach().clone().requires_grad_()
    out = mine(x2, my_ctx, images, time_context=my_t)
    out.backward(g.reshape(B, T, 32, h * w).transpose(2, 3))

    pairs = [
        ("output", out, ref.reshape(B, T, 32, h * w).transpose(2, 3)),
        ("dx", x2.grad, x.grad.reshape(B, T, 32, h * w).transpose(2, 3)),
    ]
    if ctx is not None:
        want = ctx.grad if inputs.get("per_frame") else ctx.grad.sum(1)
        pairs.append(("dcontext", my_ctx.grad, want))
    if tctx is not None:
        pairs.append(("dtime_context", my_t.grad, tctx.grad))
    pairs += _param_grads(seed, svd_to_cpdit, mine)
    _compare(f"svd: {case}", pairs)


def test_svd_converter_refuses_unknown_and_missing_keys(sgm):
    seed = sgm["SpatialVideoTransformer"](32, 4, 8, timesteps=T, use_linear=True, context_dim=16)
    state = seed.state_dict()
    with pytest.raises(SeedKeyError, match=r"does not know: \['transformer_blocks.0.extra.weight'\]"):
        svd_to_cpdit({**state, "transformer_blocks.0.extra.weight": torch.zeros(1)})
    mine = SpatialVideoTransformer(FactorizedConfig(in_channels=32, num_heads=4, head_dim=8, context_dim=16))
    partial = {k: v for k, v in svd_to_cpdit(state).items() if not k.startswith("time_mixer")}
    with pytest.raises(SeedKeyError, match=r"missing \['time_mixer.mix_factor'\]"):
        load_strict(mine, partial)
    prefixed = {f"model.diffusion_model.input_blocks.1.1.{k}": v for k, v in state.items()}
    load_strict(mine, svd_to_cpdit(prefixed, "model.diffusion_model.input_blocks.1.1."))


# --- phenaki-pytorch Attention and Transformer --------------------------------------------------------------------

DIM, HEADS, DH = 24, 4, 6
ATTN_CASES = {  # name: (seed kwargs, cpdit kwargs, inputs)
    "self, non-causal": (dict(), dict(), {}),
    "self, non-causal, null kv, position bias": (dict(num_null_kv=2), dict(num_null_kv=2), {"bias": True}),
    "self, causal (token ALiBi)": (dict(causal=True), dict(causal=True), {}),
    "self, causal, null kv (ALiBi on the null keys)": (
        dict(causal=True, num_null_kv=3),
        dict(causal=True, num_null_kv=3),
        {},
    ),
    "self, causal, 6 heads, null kv, key padding": (
        dict(causal=True, num_null_kv=2, heads=6),
        dict(causal=True, num_null_kv=2, heads=6),
        {"padding": True},
    ),
    "cross, null kv, context mask": (
        dict(dim_context=10, num_null_kv=2),
        dict(context_dim=10, num_null_kv=2),
        {"cross": True},
    ),
}


def _dense_bias(table: torch.Tensor, grid) -> torch.Tensor:
    """(H, N, N) dense form of a (H, ...) position table on `grid`."""
    pos = video_positions(torch.arange(grid[0]), grid[1], grid[2])
    return table.flatten(1)[:, relative_index(pos, pos, tuple(table.shape[1:]))]


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_phenaki_attention_equals_phenaki_pytorch(phenaki, case):
    skw, ckw, inputs = ATTN_CASES[case]
    skw, ckw = dict(skw), dict(ckw)
    heads = skw.pop("heads", HEADS)
    ckw.pop("heads", None)
    torch.manual_seed(0)
    seed = phenaki["Attention"](DIM, dim_head=DH, heads=heads, **skw).double()
    _randomize(seed, 3)
    cross = "cross" in inputs
    mine = Attention(DIM, heads, DH, **ckw).double()
    convert = lambda s: phenaki_attention_to_cpdit(s, cross=cross)  # noqa: E731
    load_strict(mine, convert(seed.state_dict()))

    gen = torch.Generator().manual_seed(4)
    N = 10
    x = torch.randn(2, N, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, N, DIM, generator=gen, dtype=torch.float64)
    ctx = mask = table = lengths = None
    grid = (N, 1, 1)  # one token per "frame": the sequence phenaki-pytorch sees
    if cross:
        ctx = torch.randn(2, 5, 10, generator=gen, dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    if "bias" in inputs:
        grid = (1, 2, 5)  # one frame of 2 x 5 tokens: a spatial position table
        table = torch.randn(heads, 1, 3, 9, generator=gen, dtype=torch.float64)
    if "padding" in inputs:
        lengths = torch.tensor([N, 7])
        mask = torch.arange(N)[None] < lengths[:, None]

    seed_bias = None if table is None else _dense_bias(table, grid)
    if cross:
        ref = seed(x, context=ctx, mask=mask)
    else:
        ref = seed(x, mask=mask, attn_bias=seed_bias)
    ref.backward(g)

    x2 = x.detach().clone().requires_grad_()
    ctx2 = None if ctx is None else ctx.detach().clone().requires_grad_()
    if cross:
        out = mine(x2, context=ctx2, context_mask=mask)
    else:
        seq = LocalSequence().bind(grid[0], grid[1] * grid[2], 0)
        out = mine(x2, seq, AttentionBias(grid, table, None, None, lengths))
    out.backward(g)
    pairs = [("output", out, ref), ("dx", x2.grad, x.grad)]
    if ctx is not None:
        pairs.append(("dcontext", ctx2.grad, ctx.grad))
    pairs += _param_grads(seed, convert, mine)
    _compare(f"phenaki attention: {case}", pairs)


class _Stack(nn.Module):
    """PhenakiBlocks + a bias-free final norm: phenaki-pytorch's Transformer in cpdit's modules."""

    def __init__(self, depth: int, **kw):
        super().__init__()
        self.blocks = nn.ModuleList(PhenakiBlock(DIM, HEADS, DH, **kw) for _ in range(depth))
        self.norm_out = nn.LayerNorm(DIM, bias=False)

    def forward(self, x, seq, bias, text, text_mask, grid):
        for block in self.blocks:
            x = block(x, seq, bias, text, text_mask, grid)
        return self.norm_out(x)


TRANSFORMER_CASES = {  # name: (seed kwargs, cpdit kwargs, (T, h, w))
    "temporal: causal, PEG causal, cross-attention": (
        dict(causal=True, peg=True, peg_causal=True, has_cross_attn=True, dim_context=10),
        dict(causal=True, peg=True, peg_causal=True, context_dim=10),
        (6, 1, 1),
    ),
    "spatial: PEG, position bias, cross-attention, 3 null kv": (
        dict(peg=True, has_cross_attn=True, dim_context=10, attn_num_null_kv=3),
        dict(peg=True, context_dim=10, cross_null_kv=3),
        (1, 2, 3),
    ),
    "causal, no cross-attention, ff_mult 2": (dict(causal=True, ff_mult=2), dict(causal=True, ff_mult=2.0), (5, 1, 1)),
}


@pytest.mark.parametrize("case", list(TRANSFORMER_CASES))
def test_phenaki_transformer_equals_phenaki_pytorch(phenaki, case):
    skw, ckw, grid = TRANSFORMER_CASES[case]
    torch.manual_seed(0)
    seed = phenaki["Transformer"](DIM, depth=2, dim_head=DH, heads=HEADS, **skw).double()
    _randomize(seed, 5)
    mine = _Stack(2, **ckw).double()
    load_strict(mine, phenaki_transformer_to_cpdit(seed.state_dict()))

    gen = torch.Generator().manual_seed(6)
    T, h, w = grid
    N = T * h * w
    x = torch.randn(2, N, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, N, DIM, generator=gen, dtype=torch.float64)
    text = torch.randn(2, 5, 10, generator=gen, dtype=torch.float64) if "dim_context" in skw else None
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]]) if text is not None else None
    table = torch.randn(HEADS, 1, 2 * h - 1, 2 * w - 1, generator=gen, dtype=torch.float64) if T == 1 else None

    ref = seed(
        x,
        video_shape=(2, T, h, w),
        attn_bias=None if table is None else _dense_bias(table, grid),
        context=text,
        cross_attn_context_mask=mask,
    )
    ref.backward(g)
    x2 = x.detach().clone().requires_grad_()
    out = mine(x2, LocalSequence().bind(T, h * w, 0), AttentionBias(grid, table), text, mask, (h, w))
    out.backward(g)
    pairs = [("output", out, ref), ("dx", x2.grad, x.grad)]
    pairs += _param_grads(seed, phenaki_transformer_to_cpdit, mine)
    _compare(f"phenaki transformer: {case}", pairs)


def test_continuous_position_bias_equals_phenaki_pytorch(phenaki):
    """phenaki-pytorch evaluates its bias MLP in float32 (`rel_pos.float()`): compared in float32."""
    torch.manual_seed(0)
    seed = phenaki["ContinuousPositionBias"](dim=16, heads=HEADS, num_dims=2, layers=2)
    _randomize(seed, 7)
    mine = ContinuousPositionBias(16, HEADS, num_dims=2, layers=2)
    load_strict(mine, phenaki_cpb_to_cpdit(seed.state_dict()))
    h, w = 3, 4
    ref = seed(h, w)  # (H, h*w, h*w)
    got = _dense_bias(mine((1, h, w), torch.float32, torch.device("cpu")), (1, h, w))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_phenaki_converter_refuses_what_it_cannot_load(phenaki):
    seed = phenaki["Transformer"](DIM, depth=1, dim_head=DH, heads=HEADS, has_cross_attn=True, dim_context=10)
    state = seed.state_dict()
    with pytest.raises(SeedKeyError, match=r"does not know: \['layers.0.5.weight'\]"):
        phenaki_transformer_to_cpdit({**state, "layers.0.5.weight": torch.zeros(1)})
    state["layers.0.1.norm.beta"] = torch.ones(DIM)
    with pytest.raises(SeedKeyError, match="layers.0.1.norm.beta is a non-zero LayerNorm bias"):
        phenaki_transformer_to_cpdit(state)
    assert torch.equal(phenaki_transformer_to_cpdit(state, norm_bias=True)["blocks.0.attn.norm.bias"], torch.ones(DIM))
    state["layers.0.1.norm.beta"] = torch.zeros(DIM)
    wrong = _Stack(1, context_dim=10, self_null_kv=2)  # null keys on the self-attention: not in the checkpoint
    with pytest.raises(SeedKeyError, match=r"missing \['blocks.0.attn.null_kv'\]"):
        load_strict(wrong, phenaki_transformer_to_cpdit(state))


def test_missing_seeds_fail_under_ci_and_skip_elsewhere(monkeypatch, tmp_path):
    import seed_modules

    monkeypatch.setattr(seed_modules, "SEEDS", tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        seed_modules.seed_file("001.txt")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="beside the project checkout"):
        seed_modules.seed_file("001.txt")
