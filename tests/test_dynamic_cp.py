# A context-parallel degree per batch (parallel/dynamic_cp.py) equals one process on the same samples, in float64:
# one optimizer step accumulates micro-batches of different clip shapes (buckets), each run by its data-parallel
# group at its own cp degree c (sub-groups of c ranks, each over its own samples; different dp groups at different
# degrees in the same micro-step), with the loss the exact mean over the step's samples of each sample's mean over
# its own tokens. Checked on every rank: each local output, every full parameter gradient and every parameter after
# one AdamW step, for ring, Ulysses, USP and all-gather attention, contiguous and zigzag frames (uneven counts),
# tensor parallelism, FSDP2 and the plain all-reduce, for the CogVideoX and the Phenaki family (frame-causal,
# per-frame timesteps, ALiBi and position-bias MLP, text mask, a padded clip).
import pytest
import torch
from distributed_helpers import run_ranks
from test_parallelize import _max_err, _report

from cpdit import CogVideoXConfig, CogVideoXDiT
from cpdit.models.phenaki.model import PhenakiDiT, PhenakiDiTConfig
from parallel.dims import ParallelDims, TopologyError
from parallel.dynamic_cp import cp_degrees, enable_dynamic_cp, sub_group_index, sub_shape, sub_strategy
from parallel.fsdp import reduce_gradients
from parallel.parallelize import Parallelized, materialize, parallelize
from parallel.state import full_tensor, load_full_state_dict

F64 = dict(rtol=1e-9, atol=1e-11)
L = 5  # text tokens


def _cogvideox():
    cfg = CogVideoXConfig.preset(
        "tiny",
        num_attention_heads=4,
        attention_head_dim=16,
        text_embed_dim=8,
        time_embed_dim=16,
        pos_embedding="rope",
        sample_height=6,
        sample_width=10,
    )
    return CogVideoXDiT, cfg


def _phenaki():
    cfg = PhenakiDiTConfig(
        text_embed_dim=8,
        num_attention_heads=4,
        attention_head_dim=4,
        num_layers=2,
        time_embed_dim=16,
        cpb_dim=8,
        self_attn_null_kv=2,
    )
    return PhenakiDiT, cfg


def _batch(family, seed, n, T, H, W):
    """A micro-batch of n clips of T latent frames of H x W: (model inputs, loss weights)."""
    gen = torch.Generator().manual_seed(seed)
    C = 4 if family == "cogvideox" else 3
    x = torch.randn(n, T, C, H, W, generator=gen, dtype=torch.float64)
    txt = torch.randn(n, L, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(n, T, C, H, W, generator=gen, dtype=torch.float64)
    if family == "cogvideox":
        return {"latents": x, "text_embeds": txt, "timesteps": torch.randint(0, 1000, (n,), generator=gen).double()}, w
    t = torch.randint(0, 1000, (n, T), generator=gen).double()  # a noise level per frame
    mask = torch.ones(n, L, dtype=torch.bool)
    mask[0, L - 2 :] = False  # padded text
    lengths = torch.full((n,), T)
    lengths[-1] = T - 1  # a padded clip
    inputs = {"latents": x, "text_embeds": txt, "timesteps": t, "text_mask": mask, "frame_lengths": lengths}
    return inputs, w


def _call(model, inputs, **kw):
    i = dict(inputs)
    return model(i.pop("latents"), i.pop("text_embeds"), i.pop("timesteps"), **i, **kw)


def _take(inputs, rows):
    return {k: v[rows] for k, v in inputs.items()}


def check_dynamic(
    rank,
    world,
    family,
    cp,
    micro,
    *,
    tp=1,
    ulysses=1,
    strategy="auto",
    layout="contiguous",
    fsdp=True,
    seed=0,
    head_chunks=None,
):
    """`micro`: the step's micro-batches, each a list over dp groups of (c, n, T, H, W): dp group d runs n clips of
    T latent frames of H x W at cp degree c. `head_chunks`: ring passes over chunks of heads (the default switches
    them on only for K/V blocks of 4 MiB or more, production sizes; forced here on small ones)."""
    dims = ParallelDims(world, cp_size=cp, model_parallel_size=tp, ulysses_size=ulysses)
    mesh = dims.build_mesh("cpu")
    cls, cfg = _cogvideox() if family == "cogvideox" else _phenaki()
    ref = cls(cfg).double()
    gen = torch.Generator().manual_seed(seed + 3)  # every weight random: no zero-initialised output layer hides a path
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    N = sum(n for step in micro for _, n, *_ in step)  # the step's samples
    batches = [[_batch(family, 100 * m + d, *s[1:]) for d, s in enumerate(step)] for m, step in enumerate(micro)]
    refs = []
    for step in batches:
        outs = []
        for inputs, w in step:
            out = _call(ref, inputs)
            per_sample = (out * w).flatten(1).sum(1) / out[0].numel()  # each sample's mean over its own tokens
            (per_sample.sum() / N).backward()
            outs.append(out.detach())
        refs.append(outs)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}

    with torch.device("meta"):
        model = cls(cfg).to(torch.float64)
    parallelize(
        model, dims, mesh, attention=strategy, layout=layout, reduce_dtype=None, fsdp=fsdp, head_chunks=head_chunks
    )
    materialize(model, "cpu")
    load_full_state_dict(model, sd)
    seam = enable_dynamic_cp(model, dims, sorted({c for step in micro for c, *_ in step}))
    par = Parallelized(dims, mesh, model, None)
    d = dims.dp_rank(rank)
    what = (
        f"{family} rank {rank} cp={cp} tp={tp} ulysses={ulysses} {strategy} {layout} fsdp={fsdp} chunks={head_chunks}"
    )
    out_err = 0.0
    for m, step in enumerate(micro):
        c, n = step[d][:2]
        inputs, w = batches[m][d]
        k, groups = sub_group_index(dims, rank, c)
        rows = slice(k * n // groups, (k + 1) * n // groups)  # this sub-group's share of the replica's clips
        with seam.use(c):
            out = _call(model, _take(inputs, rows), return_local=True)
            want = par.local_frames(refs[m][d][rows])
            torch.testing.assert_close(out, want, **F64, msg=lambda e, m=m, c=c: f"{what} micro {m} c={c}: {e}")
            out_err = max(out_err, _max_err(out.detach(), want))
            share = (out * par.local_frames(w[rows])).flatten(1).sum(1) / refs[m][d][0].numel()
            (share.sum() * dims.dp / N).backward()  # summed over cp, averaged over dp: the step's mean
    reduce_gradients(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            full_tensor(p.grad), ref_grads[name], **F64, msg=lambda e, name=name: f"{what} grad {name}: {e}"
        )
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ref.step()
    opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(full_tensor(p.detach()), ref_params[name].detach(), **F64, msg=name)
    _report(
        f"dynamic cp: {what} micro-batches {micro}",
        output=out_err,
        grads=max(_max_err(full_tensor(p.grad), ref_grads[n]) for n, p in model.named_parameters()),
        params_after_step=max(
            _max_err(full_tensor(p.detach()), ref_params[n].detach()) for n, p in model.named_parameters()
        ),
    )
    del model, mesh, seam, opt


# (c, n, T, H, W) per dp group; 13 and 5 latent frames split unevenly over 2 and 4 ranks; two aspect ratios
LONG, SHORT, WIDE = (13, 6, 10), (5, 6, 10), (3, 10, 6)


def _four(rank, world):
    three = [[(4, 1, *LONG)], [(2, 2, *SHORT)], [(1, 4, *WIDE)]]  # cp 4, then two sub-groups of 2, then 4 alone
    check_dynamic(rank, world, "cogvideox", 4, three, strategy="ring")
    check_dynamic(rank, world, "cogvideox", 4, three, strategy="ring", head_chunks=2)  # the chunked ring, every degree
    check_dynamic(rank, world, "cogvideox", 4, three, ulysses=4, strategy="ulysses", layout="zigzag")
    check_dynamic(rank, world, "cogvideox", 4, [[(4, 1, *LONG)], [(2, 2, *WIDE)]], ulysses=2, strategy="usp")
    check_dynamic(rank, world, "cogvideox", 4, [[(2, 2, *SHORT)], [(1, 4, *SHORT)]], strategy="allgather")
    # dp=2 x cp=2: the two replicas hold different buckets at different degrees in the same micro-steps
    two = [[(2, 1, *LONG), (1, 2, *SHORT)], [(1, 4, *WIDE), (2, 2, *SHORT)]]
    check_dynamic(rank, world, "cogvideox", 2, two)
    check_dynamic(rank, world, "cogvideox", 2, two, fsdp=False, layout="zigzag")
    check_dynamic(rank, world, "cogvideox", 2, [[(2, 1, *LONG)], [(1, 2, *WIDE)]], tp=2)  # cp 2 x tp 2
    check_dynamic(rank, world, "phenaki", 4, [[(4, 2, 7, 6, 6)], [(2, 2, 5, 4, 6)], [(1, 4, 3, 6, 4)]], layout="zigzag")
    check_dynamic(rank, world, "phenaki", 2, [[(2, 2, 7, 6, 6), (1, 2, 3, 4, 6)]], fsdp=False)


def _eight(rank, world):
    usp = [[(8, 1, *LONG)], [(4, 2, *SHORT)], [(2, 4, *WIDE)], [(1, 8, 2, 6, 10)]]
    check_dynamic(rank, world, "cogvideox", 8, usp, ulysses=2, strategy="usp")  # c=4: ring 2 x ulysses 2
    check_dynamic(rank, world, "cogvideox", 4, [[(4, 1, *LONG), (2, 2, *SHORT)], [(1, 4, *WIDE), (4, 1, *SHORT)]])
    check_dynamic(rank, world, "cogvideox", 4, [[(4, 1, *LONG)], [(2, 2, *WIDE)]], tp=2, ulysses=2, strategy="usp")
    check_dynamic(rank, world, "phenaki", 4, [[(4, 1, 7, 6, 6), (1, 4, 3, 4, 6)]], strategy="ring", fsdp=False)


def test_dynamic_cp_parity_4_ranks(tmp_path):
    run_ranks(_four, 4, tmp_path, timeout=600)


@pytest.mark.slow  # 8 processes on 2 cores
def test_dynamic_cp_parity_8_ranks(tmp_path):
    run_ranks(_eight, 8, tmp_path, timeout=900)


def test_degrees_and_sub_groups():
    dims = ParallelDims(16, cp_size=8, ulysses_size=2)
    assert cp_degrees(dims) == [1, 2, 4, 8]
    assert [sub_shape(dims, c) for c in (1, 2, 4)] == [(1, 1), (1, 2), (2, 2)]
    assert sub_strategy("usp", 1, 2) == "ulysses" and sub_strategy("usp", 4, 1) == "ring"
    assert sub_strategy("usp", 2, 2) == "usp"
    # rank 5 = dp 0, cp index 5 (ring 2, ulysses 1): sub-group 2 of 4 at degree 2, sub-group 1 of 2 at degree 4
    assert sub_group_index(dims, 5, 2) == (2, 4) and sub_group_index(dims, 5, 4) == (1, 2)
    assert cp_degrees(ParallelDims(12, cp_size=12, ulysses_size=4)) == [1, 2, 4, 12]  # 3 and 6 split no Ulysses group
    with pytest.raises(TopologyError, match="cp degree of 6 cannot split cp_size=12.*use one of"):
        sub_shape(ParallelDims(12, cp_size=12, ulysses_size=4), 6)
