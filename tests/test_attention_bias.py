# Context-parallel attention with the Phenaki family's biases (cpdit/attn_bias.py) vs dense single-process
# attention with the full bias: ALiBi (6 heads: not a power of two) plus a learned continuous position bias over
# (t, h, w), learned null keys/values (with ALiBi on them when causal), text and frame padding masks — outputs,
# dq/dk/dv, and the gradients of the bias MLP and the null keys/values, on every rank, every strategy, causal and
# not, contiguous and zigzag, uneven frames (7 on 2 and 4 ranks), float64; and with the bias built in blocks of 5
# query rows (bias_rows: the bounded working set), which must not change a bit of it beyond rounding.
import itertools

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks
from torch.distributed.device_mesh import init_device_mesh

from cpdit.attn_bias import (
    AttentionBias,
    ContinuousPositionBias,
    alibi_slopes,
    alibi_table,
    dense_attention,
    relative_index,
    video_positions,
)
from parallel.attention import context_parallel_attention
from parallel.sequence import SequencePlan

F64 = dict(rtol=1e-10, atol=1e-10)
MESHES = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2)]}
GRID = (7, 2, 3)  # frames, height, width (tokens per frame 6)
H, D = 6, 8


def _inputs(L: int, seed: int, B: int = 2):
    gen = torch.Generator().manual_seed(seed)
    S = L + GRID[0] * GRID[1] * GRID[2]
    q, k, v, g = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) for _ in range(4))
    torch.manual_seed(seed)
    cpb = ContinuousPositionBias(16, H).double()
    null = torch.randn(2, H, 2, D, generator=gen, dtype=torch.float64)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[1, L // 2 :] = False
    return q, k, v, g, cpb, null, text_mask, torch.tensor([GRID[0], GRID[0] - 2])


def _bias(cpb, null, text_mask, lengths, causal) -> AttentionBias:
    """Causal: ALiBi also on the null keys (phenaki-pytorch's causal attention)."""
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64)
    table = cpb(GRID, torch.float64, torch.device("cpu")) + alibi_table(slopes, GRID[0])
    return AttentionBias(GRID, table, null, text_mask, lengths, slopes if causal else None)


def check_bias_case(rank, plan, strategy, causal, seed, bias_rows=None, head_chunks=None):
    L, cp = plan.text_len, plan.cp_size
    q, k, v, g, cpb, null, text_mask, lengths = _inputs(L, seed)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, null)]
    ref = dense_attention(*ref_in[:3], _bias(cpb, ref_in[3], text_mask, lengths, causal), text_len=L, causal=causal)
    params = list(cpb.parameters())
    ref_grads = torch.autograd.grad(ref, [*ref_in, *params], g)
    local = [plan._take(t, 2).requires_grad_() for t in (q, k, v)]
    null_local = null.clone().requires_grad_()
    bias = _bias(cpb, null_local, text_mask, lengths, causal)
    out = context_parallel_attention(
        *local, plan, causal=causal, strategy=strategy, bias=bias, bias_rows=bias_rows, head_chunks=head_chunks
    )
    weights = torch.arange(1, cp + 1, dtype=torch.float64) / (cp * (cp + 1) / 2)
    dout = plan._take(g, 2).clone()
    dout[:, :, :L] = g[:, :, :L] * weights[plan.cp_rank]  # this rank's share of the text gradient
    grads = torch.autograd.grad(out, [*local, null_local, *params], dout)

    ctx = f"rank={rank} strategy={strategy} causal={causal} layout={plan.layout} L={L} cp={cp} rows={bias_rows}"
    ctx += f" head_chunks={head_chunks}"
    torch.testing.assert_close(out, plan._take(ref, 2), **F64, msg=lambda m: f"{ctx}: {m}")
    for name, grad, want in zip("qkv", grads[:3], ref_grads[:3], strict=True):
        want = plan._take(want, 2)
        torch.testing.assert_close(grad[:, :, L:], want[:, :, L:], **F64, msg=lambda m, n=name: f"{ctx} d{n}: {m}")
        text = grad[:, :, :L].contiguous()
        if plan.cp_group is not None:
            dist.all_reduce(text, group=plan.cp_group)
        torch.testing.assert_close(text, want[:, :, :L], **F64, msg=lambda m, n=name: f"{ctx} d{n} text: {m}")
    for i, (grad, want) in enumerate(zip(grads[3:], ref_grads[3:], strict=True)):  # partial: summed over cp
        grad = grad.contiguous()
        if plan.cp_group is not None:
            dist.all_reduce(grad, group=plan.cp_group)
        what = "null_kv" if i == 0 else f"bias MLP parameter {i - 1}"
        torch.testing.assert_close(grad, want, **F64, msg=lambda m, w=what: f"{ctx} d{w}: {m}")


def _strategies(ring, ulysses):
    if ring * ulysses == 1:
        return ["auto"]
    out = ["ring", "allgather"]
    out += ["ulysses"] if ring == 1 else []
    out += ["usp"] if ring > 1 and ulysses > 1 else []
    return out


def _bias_worker(rank, world):
    seed = 0
    for ring, ulysses in MESHES[world]:
        mesh = init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("cp_ring", "cp_ulysses"))
        for layout, L, causal in itertools.product(("contiguous", "zigzag"), (0, 4), (False, True)):
            plan = SequencePlan(GRID[0], GRID[1] * GRID[2], L, mesh, layout)
            for strategy in _strategies(ring, ulysses):
                seed += 1
                check_bias_case(rank, plan, strategy, causal, seed)
                if layout == "zigzag":  # bounded bias blocks: 5 query rows per kernel call (frames are 6 tokens)
                    check_bias_case(rank, plan, strategy, causal, seed, bias_rows=5)
        del mesh


@pytest.mark.parametrize("world", [1, 2, 4])
def test_bias_parity_float64(tmp_path, world):
    run_ranks(_bias_worker, world, tmp_path)


def _bias_head_chunks_worker(rank, world):
    # The ring in chunks of heads with every bias: 6 heads in 4 uneven passes (2,2,1,1), each pass with its slice of
    # the table, the null keys/values and the null slopes, and the table's and null_kv's gradients written into
    # their head slice; USP: 3 heads per Ulysses member in 2 passes (2,1).
    seed = 100
    for (ring, ulysses), strategy, chunks in (((4, 1), "ring", 4), ((2, 2), "usp", 2), ((2, 2), "ring", 4)):
        mesh = init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("cp_ring", "cp_ulysses"))
        for layout, causal in itertools.product(("contiguous", "zigzag"), (False, True)):
            plan = SequencePlan(GRID[0], GRID[1] * GRID[2], 4, mesh, layout)
            seed += 1
            check_bias_case(rank, plan, strategy, causal, seed, head_chunks=chunks)
        del mesh


def test_bias_parity_in_chunks_of_heads(tmp_path):
    run_ranks(_bias_head_chunks_worker, 4, tmp_path)


def test_alibi_slopes_follow_the_seed():
    # powers of two: the geometric sequence 2^(-8/n * i); 6 heads: the 4-head sequence then every other 8-head slope
    assert alibi_slopes(4) == [2**-2, 2**-4, 2**-6, 2**-8]
    assert alibi_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    assert len(alibi_slopes(30)) == 30


def test_relative_index_matches_pairwise_offsets():
    pos = video_positions(torch.tensor([0, 2, 3]), 2, 3)  # frames 0, 2, 3 of a (4, 2, 3) grid
    shape = (7, 3, 5)
    idx = relative_index(pos, pos, shape)
    table = torch.arange(7 * 3 * 5).view(1, *shape)
    for i, j in [(0, 5), (7, 2), (17, 0), (11, 11)]:
        dt, dy, dx = (pos[i] - pos[j]).tolist()
        assert table.flatten(1)[0, idx[i, j]] == table[0, dt + 3, dy + 1, dx + 2]


def test_continuous_bias_equals_per_pair_mlp():
    # the table lookup gives the same numbers as evaluating the seed's MLP on every (query, key) pair
    torch.manual_seed(0)
    cpb = ContinuousPositionBias(8, 3).double()
    grid = (3, 2, 2)
    table = cpb(grid, torch.float64, torch.device("cpu"))
    pos = video_positions(torch.arange(3), 2, 2)
    rel = (pos[:, None] - pos[None]).double()
    rel = torch.sign(rel) * torch.log(rel.abs() + 1)
    for layer in cpb.net:
        rel = torch.nn.functional.leaky_relu(layer(rel), 0.1)
    per_pair = cpb.out(rel).permute(2, 0, 1)
    looked_up = table.flatten(1)[:, relative_index(pos, pos, tuple(table.shape[1:]))]
    torch.testing.assert_close(looked_up, per_pair, rtol=0, atol=1e-14)
