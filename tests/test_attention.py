# Context-parallel attention vs single-process attention over the full sequence: outputs and dq/dk/dv on every
# rank, every strategy, causal and not, contiguous and zigzag, with and without text, uneven frames and heads.
import itertools

import pytest
import torch
import torch.distributed as dist
from attention_reference import reference_attention
from distributed_helpers import run_ranks
from torch.distributed.device_mesh import init_device_mesh

from parallel.attention import context_parallel_attention, resolve_strategy
from parallel.sequence import SequencePlan, frame_partition

# float64 proves the algorithm: only summation order differs from the reference.
F64 = dict(rtol=1e-10, atol=1e-10)
# bf16 inputs: the reference is float64 on the same bf16-rounded inputs; bf16 outputs carry ~3 significant
# digits and the block partials are rounded to bf16 before the fp32 merge.
BF16_OUT = dict(rtol=2e-2, atol=2e-2)
BF16_GRAD = dict(rtol=5e-2, atol=5e-2)


def _cp_mesh(ring, ulysses):
    return init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("cp_ring", "cp_ulysses"))


def check_case(rank, plan, strategy, causal, H, D, dtype, seed, B=1, head_chunks=None):
    """Run one parity case on this rank; every assertion is made on every rank."""
    L, T, tpf, cp = plan.text_len, plan.num_frames, plan.tokens_per_frame, plan.cp_size
    gen = torch.Generator().manual_seed(seed)
    S = plan.full_len
    q, k, v, g = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4))
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, L, T, tpf, causal)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())

    local = [plan._take(t, 2).detach().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*local, plan, causal=causal, strategy=strategy, head_chunks=head_chunks)
    assert out.dtype == dtype and out.shape == local[0].shape
    # dout: the frames' gradient, plus this rank's share of the text gradient (shares differ per rank).
    weights = torch.arange(1, cp + 1, dtype=torch.float64) / (cp * (cp + 1) / 2)
    dout = plan._take(g, 2).clone()
    dout[:, :, :L] = (g[:, :, :L].double() * weights[plan.cp_rank]).to(dtype)
    out.backward(dout)

    tol_out, tol_grad = (F64, F64) if dtype == torch.float64 else (BF16_OUT, BF16_GRAD)
    ctx = f"rank={rank} strategy={strategy} causal={causal} layout={plan.layout} L={L} T={T} H={H} {dtype}"
    ctx += f" head_chunks={head_chunks}"
    torch.testing.assert_close(out.double(), plan._take(ref, 2).double(), **tol_out, msg=lambda m: f"{ctx}: {m}")
    for name, local_t, ref_g in zip("qkv", local, ref_grads, strict=True):
        grad = local_t.grad.double()
        want = plan._take(ref_g, 2)
        torch.testing.assert_close(grad[:, :, L:], want[:, :, L:], **tol_grad, msg=lambda m, n=name: f"{ctx} d{n}: {m}")
        text = grad[:, :, :L].contiguous()
        if plan.cp_group is not None:  # partial convention: the shares sum to the true text gradient
            dist.all_reduce(text, group=plan.cp_group)
        torch.testing.assert_close(text, want[:, :, :L], **tol_grad, msg=lambda m, n=name: f"{ctx} d{n} text: {m}")
    if L and plan.cp_group is not None:  # replicated text outputs are bitwise identical on every cp rank
        mine = out[:, :, :L].detach().contiguous()
        gathered = [torch.empty_like(mine) for _ in range(cp)]
        dist.all_gather(gathered, mine, group=plan.cp_group)
        assert all(torch.equal(x, mine) for x in gathered), f"{ctx}: text outputs differ across cp ranks"


MESHES = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}


def _strategies(ring, ulysses, heads):
    out = ["auto", "ring", "allgather"]
    if heads >= ring * ulysses:
        out.append("ulysses")
    if ring > 1 and ulysses > 1:
        out.append("usp")
    return out


def _parity_worker(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    H, D, tpf = 6, 8, 3
    seed = 0
    for ring, ulysses in MESHES[world]:
        mesh = _cp_mesh(ring, ulysses)
        for layout, L, causal in itertools.product(("contiguous", "zigzag"), (0, 5), (False, True)):
            if dtype != torch.float64 and (layout, L) != ("zigzag", 5):
                continue  # bf16: one layout covers the precision question
            plan = SequencePlan(13, tpf, L, mesh, layout)
            for strategy in _strategies(ring, ulysses, H):
                seed += 1
                check_case(rank, plan, strategy, causal, H, D, dtype, seed)
        del mesh


@pytest.mark.parametrize("world", [1, 2, 4])
def test_parity_float64(tmp_path, world):
    run_ranks(_parity_worker, world, tmp_path, "float64")


@pytest.mark.parametrize("world", [2, 4])
def test_parity_bfloat16(tmp_path, world):
    run_ranks(_parity_worker, world, tmp_path, "bfloat16")


def _cogvideox_shapes_worker(rank, world):
    # CogVideoX's awkward shapes: 30 heads over ulysses 4 (8,8,7,7), 13 latent frames over 4 ranks, 226 text tokens.
    for ring, ulysses in ((1, 4), (2, 2), (4, 1)):
        mesh = _cp_mesh(ring, ulysses)
        plan = SequencePlan(13, 2, 226, mesh, "contiguous")
        for strategy, causal in itertools.product(_strategies(ring, ulysses, 30), (False, True)):
            check_case(rank, plan, strategy, causal, 30, 4, torch.float64, seed=100 + ring)
        del mesh


def test_cogvideox_shapes(tmp_path):
    run_ranks(_cogvideox_shapes_worker, 4, tmp_path)


def _head_chunks_worker(rank, world):
    # The ring in chunks of heads, the default once K+V of a block reach CHUNK_ABOVE_BYTES (every CogVideoX
    # block): 30 heads in 8 uneven passes (4,4,4,4,4,4,3,3) over the whole ring, and under USP 15 heads per Ulysses
    # member in 8 passes (2,...,2,1); 7 heads in 8 asks for more passes than heads (capped at 7).
    for (ring, ulysses), strategy in (((4, 1), "ring"), ((2, 2), "usp"), ((2, 2), "ring")):
        mesh = _cp_mesh(ring, ulysses)
        for layout, causal in itertools.product(("contiguous", "zigzag"), (False, True)):
            plan = SequencePlan(13, 3, 5, mesh, layout)
            for H, chunks in ((30, 8), (7, 8)):
                check_case(rank, plan, strategy, causal, H, 4, torch.float64, seed=H + ring, B=2, head_chunks=chunks)
        del mesh


def test_ring_in_chunks_of_heads(tmp_path):
    run_ranks(_head_chunks_worker, 4, tmp_path)


def test_default_head_chunks_rule():
    # README: 8 ring passes once a block's K + V reach 4 MiB, one below (the CogVideoX-2B block at cp=2: 30 heads,
    # 8213 tokens, head dim 64, fp32 K is 63 MiB).
    from parallel.attention import CHUNK_ABOVE_BYTES, default_head_chunks

    assert CHUNK_ABOVE_BYTES == 4 << 20
    just_below = torch.empty(1, 1, (CHUNK_ABOVE_BYTES // 8) - 1, 1)  # fp32 K: K + V = 4 MiB - 8 bytes
    assert default_head_chunks(just_below) == 1
    assert default_head_chunks(torch.empty(1, 1, CHUNK_ABOVE_BYTES // 8, 1)) == 8
    assert default_head_chunks(torch.empty(1, 30, 8213, 64)) == 8
    assert default_head_chunks(torch.empty(1, 30, 8213, 64, dtype=torch.bfloat16)) == 8


def _few_frames_worker(rank, world):
    # zigzag with fewer frames than chunks (some chunks empty), one frame per rank, batch > 1.
    mesh = _cp_mesh(4, 1)
    for T, layout in ((4, "zigzag"), (5, "zigzag"), (4, "contiguous")):
        plan = SequencePlan(T, 5, 3, mesh, layout)
        for strategy, causal in itertools.product(("ring", "allgather", "ulysses"), (False, True)):
            check_case(rank, plan, strategy, causal, 4, 8, torch.float64, seed=T, B=2)
    del mesh


def test_few_frames_and_batch(tmp_path):
    run_ranks(_few_frames_worker, 4, tmp_path)


def _shard_gather_worker(rank, world):
    mesh = _cp_mesh(world // 2, 2)
    for layout in ("contiguous", "zigzag"):
        plan = SequencePlan(13, 3, 4, mesh, layout)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(2, plan.full_len, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, plan.full_len, 5, generator=gen, dtype=torch.float64)
        local = plan.shard(x, 1)
        assert local.shape == (2, plan.local_len(), 5)
        ids = plan.local_token_frame_ids()
        torch.testing.assert_close(local[:, 4:], x[:, 4 + ids * 3 + torch.arange(len(ids)) % 3], rtol=0, atol=0)
        full = plan.gather(local, 1)
        torch.testing.assert_close(full, x, rtol=0, atol=0)  # exact inverse
        full.backward(g)  # replicated use after gather: identical g on every rank
        grad = x.grad.clone()
        mine = torch.zeros_like(grad)
        mine[:, 4:] = 1  # this rank's own frames keep the full gradient...
        own = torch.zeros(plan.full_len, dtype=torch.bool)
        own[4 + ids * 3 + torch.arange(len(ids)) % 3] = True
        torch.testing.assert_close(grad[:, own], g[:, own], rtol=0, atol=0)
        assert (grad[:, 4:][:, ~own[4:]] == 0).all()  # ...others' frames get nothing from this rank
        dist.all_reduce(grad, group=plan.cp_group)  # ...and the shares sum to the true gradient
        torch.testing.assert_close(grad, g, rtol=1e-12, atol=1e-12)
        x.grad = None
    del mesh


@pytest.mark.parametrize("world", [2, 4])
def test_shard_gather_round_trip(tmp_path, world):
    run_ranks(_shard_gather_worker, world, tmp_path)


def test_frame_partition_tables():
    assert [sum(b - a for a, b in s) for s in frame_partition(13, 4)] == [4, 3, 3, 3]
    assert frame_partition(13, 4, "zigzag") == [
        [(0, 2), (12, 13)],
        [(2, 4), (11, 12)],
        [(4, 6), (10, 11)],
        [(6, 8), (8, 10)],
    ]
    assert frame_partition(4, 4, "zigzag") == [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 4)]]
    assert frame_partition(49, 1) == [[(0, 49)]]
    with pytest.raises(ValueError, match="num_frames=3 < cp_size=4"):
        frame_partition(3, 4)
    with pytest.raises(ValueError, match="layout='spiral'"):
        frame_partition(8, 2, "spiral")


def test_bad_inputs_single_process():
    plan = SequencePlan(4, 3, 2)
    q = torch.randn(1, 2, plan.full_len, 8)
    with pytest.raises(ValueError, match="parallel.attention='flash'"):
        context_parallel_attention(q, q, q, plan, strategy="flash")
    with pytest.raises(ValueError, match="q has 13 tokens but the plan gives this rank 14"):
        context_parallel_attention(q[:, :, 1:], q[:, :, 1:], q[:, :, 1:], plan)
    with pytest.raises(ValueError, match="one shape"):
        context_parallel_attention(q, q[:, :1], q, plan)
    with pytest.raises(ValueError, match="tokens_per_frame=0"):
        SequencePlan(4, 0, 2)
    with pytest.raises(ValueError, match="expected 14"):
        plan.shard(q[:, :, 1:], 2)
    assert resolve_strategy("auto", plan, 2) == "local"
