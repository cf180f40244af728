# The byte counter (parallel/comm.py): cpdit's own collectives count what each rank sends, and count_all_traffic()
# adds what torch issues itself (FSDP2's c10d calls, DTensor's functional collectives), once each.
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from distributed_helpers import run_ranks

from cpdit import CogVideoXConfig, CogVideoXDiT
from parallel.all_traffic import count_all_traffic
from parallel.comm import BYTES, agree, all_reduce
from parallel.dims import ParallelDims
from parallel.parallelize import materialize, parallelize


def _known_collectives(rank, world):
    t = torch.ones(1000)  # 4000 bytes
    original = dist.all_reduce
    with count_all_traffic():
        BYTES.reset()
        funcol.all_reduce(t, "sum", dist.group.WORLD).wait()
        assert BYTES.sent == 2 * (world - 1) * 4000 // world  # ring all-reduce
        BYTES.reset()
        dist.all_gather_single(torch.empty(1000 * world), t)
        assert BYTES.sent == (world - 1) * 4000
        BYTES.reset()
        dist.reduce_scatter_single(torch.empty(1000 // world), t)
        assert BYTES.sent == (world - 1) * 4000 // world
        BYTES.reset()
        dist.all_reduce(t.clone())
        all_reduce(t.clone(), None, "counted once")  # cpdit's own helper is not counted twice
        assert BYTES.sent == 2 * (2 * (world - 1) * 4000 // world)
    assert dist.all_reduce is original
    BYTES.reset()
    dist.all_reduce(t.clone())  # outside: torch's own calls are not counted
    assert BYTES.sent == 0


def _model_step(rank, world, cp, tp):
    dims = ParallelDims(world, cp_size=cp, model_parallel_size=tp)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = CogVideoXDiT(CogVideoXConfig.preset("tiny"))
    materialize(parallelize(model, dims, mesh), "cpu")
    x, txt, t = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 5, 32), torch.tensor([3.0])
    counts = []
    for everything in (False, True):
        BYTES.reset()
        if everything:
            with count_all_traffic():
                model(x, txt, t, return_local=True).square().mean().backward()
        else:  # attention and cpdit's own collectives only
            model(x, txt, t, return_local=True).square().mean().backward()
        counts.append(BYTES.sent)
    extra = counts[1] - counts[0]
    floor = 0
    if cp > 1:  # FSDP2 gathers every parameter at least once: (cp - 1) / cp of this tp rank's parameter bytes
        params = sum(p.numel() * 4 for p in CogVideoXDiT(CogVideoXConfig.preset("tiny")).parameters())
        floor += (cp - 1) * params // cp // tp
    if tp > 1:  # the row-parallel outputs (attention and feed-forward of 2 blocks) are all-reduced in the forward
        tokens = 5 + (4 // cp) * (8 // 2) * (8 // 2)
        floor += 4 * 2 * (tp - 1) * tokens * 96 * 4 // tp
    assert extra >= floor > 0, (counts, floor)
    del model, mesh


def test_known_collectives_are_counted_once(tmp_path):
    run_ranks(_known_collectives, 2, tmp_path)


@pytest.mark.parametrize("cp, tp", [(2, 1), (1, 2), (2, 2)])
def test_a_model_step_counts_fsdp_and_tensor_parallel_traffic(tmp_path, cp, tp):
    run_ranks(_model_step, cp * tp, tmp_path, cp, tp)


def _agree(rank, world):
    flags = [rank == 1, rank != 2, 7 * rank]
    assert agree(flags, "max", "test") == [1, 1, 7 * (world - 1)]  # any rank's flag, the largest count
    assert agree(flags, "min", "test") == [0, 0, 0]  # every rank's flag
    sub = dist.new_group([0, 1])
    if rank < 2:
        assert agree([rank], "min", "test", sub) == [0] and agree([rank], "max", "test", sub) == [1]
    dist.destroy_process_group(sub)


def test_ranks_agree_on_flags_and_counts(tmp_path):
    run_ranks(_agree, 4, tmp_path)
