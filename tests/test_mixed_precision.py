# bf16 training as users run it on GPUs (train.mixed_precision=bf16): FSDP2 all-gathers the parameters in bf16 and
# reduce-scatters the gradients in fp32 into fp32 master weights (parallel.fsdp.precision_policy), under bf16
# autocast. On a fixed batch, every layout's bf16 step is within the tolerances below of the fp32 single-process step
# (output, every gradient, the parameters after one AdamW step); the master weights, their gradients and AdamW's
# state stay fp32; and FSDP2's all-gathers move half the bytes of fp32 ones.
import pytest
import torch
from distributed_helpers import run_ranks
from test_parallelize import _config, _inputs, _weights

from cpdit import CogVideoXDiT
from parallel.all_traffic import count_all_traffic
from parallel.dims import ParallelDims
from parallel.fsdp import reduce_gradients
from parallel.parallelize import Parallelized, materialize, parallelize
from parallel.state import full_tensor, load_full_state_dict

# |got - ref| / |ref| (Frobenius norms) of the output and of each gradient: bf16 keeps ~3 significant digits, and the
# rounding errors add up through the 2 blocks and their backward. A gradient's |ref| counts at least 1% of the whole
# gradient's norm: some are zero up to rounding (a bias on every key cancels in the softmax: norm_k.bias)
OUT_TOL, GRAD_TOL = 2e-2, 0.12  # measured: output up to 6.5e-3, gradients up to 8.2e-2 (dp=4)
LR = 1e-2


def _rel(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-12) -> float:
    return ((got.float() - ref).norm() / ref.norm().clamp_min(floor)).item()


def _built(cfg, dims, mesh, sd, param_dtype, **kw):
    with torch.device("meta"):
        model = CogVideoXDiT(cfg)
    parallelize(model, dims, mesh, param_dtype=param_dtype, reduce_dtype=torch.float32, **kw)
    materialize(model, "cpu")
    load_full_state_dict(model, sd)
    return model


def _gathered_bytes(model) -> int:
    """Bytes this rank sends in FSDP2's all-gathers of every unit's parameters (unshard), counted on the wire."""
    from torch.distributed.fsdp import FSDPModule

    with count_all_traffic() as counter:
        before = counter.sent
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.unshard()
                m.reshard()
        return counter.sent - before


def check_bf16(rank, world, cp, tp, ulysses=1, strategy="auto", replicate=1, fsdp=True, pos="sincos", report=None):
    dims = ParallelDims(world, cp_size=cp, model_parallel_size=tp, ulysses_size=ulysses, dp_replicate=replicate)
    mesh = dims.build_mesh("cpu")
    cfg = _config(pos)
    ref = CogVideoXDiT(cfg)  # fp32, no autocast: the reference step
    sd = {k: v.float() for k, v in _weights(ref, 0).items()}
    ref.load_state_dict(sd)
    x, txt, t, w = (a.float() for a in _inputs(dims.dp, 1, cfg))
    out_ref = ref(x, txt, t)
    n = out_ref.numel()
    (out_ref * w).sum().div(n).backward()

    kw = dict(attention=strategy, fsdp=fsdp)
    model = _built(cfg, dims, mesh, sd, torch.bfloat16, **kw)
    d = dims.dp_rank(rank)
    mine = slice(d, d + 1)
    local = Parallelized(dims, mesh, model, None).local_frames
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_local = model(x[mine], txt[mine], t[mine], return_local=True)
    ((out_local.float() * local(w[mine])).sum() * dims.dp / n).backward()
    reduce_gradients(model)
    what = f"rank {rank} cp={cp} tp={tp} ulysses={ulysses} {strategy} replicas={replicate} fsdp={fsdp}"
    errs = {"output": _rel(out_local, local(out_ref[mine].detach()))}
    ref_params = dict(ref.named_parameters())
    floor = 1e-2 * torch.cat([q.grad.flatten() for q in ref.parameters()]).norm().item()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, (what, name, p.dtype, p.grad.dtype)
        errs[name] = _rel(full_tensor(p.grad), ref_params[name].grad, floor)
    assert errs["output"] <= OUT_TOL, (what, errs["output"])
    worst = max((v, k) for k, v in errs.items() if k != "output")
    assert worst[0] <= GRAD_TOL, (what, worst)

    # one AdamW step: fp32 state; each element moves by at most ~lr from where the fp32 step puts it
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
    opt.step()
    opt_ref.step()
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, (what, name)
        gap = (full_tensor(p.detach()) - ref_params[name].detach()).abs().max().item()
        assert gap <= 2.05 * LR, (what, name, gap)  # a sign the bf16 gradient got wrong moves 2 lr the other way
    if report is not None and rank == 0:
        report.append((what, errs["output"], worst))

    if fsdp and dims.size("dp_cp") > 1:  # the all-gathers: bf16 moves half the bytes of fp32
        fp32 = _built(cfg, dims, mesh, sd, None, **kw)
        bf16_bytes, fp32_bytes = _gathered_bytes(model), _gathered_bytes(fp32)
        assert fp32_bytes > 0 and bf16_bytes * 2 == fp32_bytes, (what, bf16_bytes, fp32_bytes)
        del fp32
    del model, mesh, opt


def _four(rank, world):
    report = []
    check_bf16(rank, world, cp=2, tp=2, report=report)  # FSDP over cp, DTensor TP
    check_bf16(rank, world, cp=2, tp=1, report=report)  # dp=2 x cp=2
    check_bf16(rank, world, cp=1, tp=1, report=report)  # dp=4: FSDP alone
    check_bf16(rank, world, cp=2, tp=1, replicate=2, report=report)  # HSDP: 2 replicas x cp=2 shards
    check_bf16(rank, world, cp=4, tp=1, ulysses=2, strategy="usp", pos="rope", report=report)
    check_bf16(rank, world, cp=2, tp=2, fsdp=False, report=report)  # no FSDP: autocast from fp32 parameters
    return report


def _one(rank, world):
    report = []
    check_bf16(rank, world, cp=1, tp=1, pos="rope", report=report)  # one process: autocast only
    return report


@pytest.mark.parametrize("world, fn", [(1, _one), (4, _four)], ids=["1", "4"])
def test_bf16_step_is_close_to_fp32(tmp_path, world, fn):
    reports = run_ranks(fn, world, tmp_path, timeout=600)
    for what, out, (grad, name) in reports[0]:
        print(f"{what}: output {out:.2e}, worst gradient {grad:.2e} ({name})")
