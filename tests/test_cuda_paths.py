# The CUDA-only code, checked on a machine without a GPU: fake CUDA tensors (FakeTensorMode, which needs no device)
# run the ops' meta kernels, so the private attention ops of parallel/attention/kernels.py are called with their real
# argument lists and their outputs' shapes and dtypes are checked against what the ring, Ulysses and all-gather code
# expects (bench/gpu.py's (a0), which its --dry-run prints); and the gradient norm's device-to-host copies (a stall
# of the GPU each) are counted. What meta kernels do not inspect (a swap of two tensors of the same shape and dtype)
# only a GPU run can catch: bench/gpu.py without --dry-run compares the kernels with float64.
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.attention import kernels
from parallel.grad_norm import global_grad_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu import FAKE_CASES, fake_cuda_kernel  # noqa: E402

aten = torch.ops.aten


@pytest.mark.parametrize("case", FAKE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_cuda_kernels_on_fake_cuda_tensors(case):
    """bench/gpu.py's (a0): each CUDA kernel call, forward and backward, on fake CUDA tensors."""
    dtype, D, with_bias = case[:3]
    r = fake_cuda_kernel(*case)
    assert r["kernel"] == ("flash" if dtype != torch.float32 and not with_bias and D <= 256 else "efficient")
    assert not r["problems"], r["problems"]


def test_block_entry_points_on_fake_cuda_tensors():
    """block_forward / block_backward pick the CUDA kernels for CUDA tensors and keep their shapes (without a bias:
    with one they look for dead rows, which needs values)."""
    with FakeTensorMode():
        q = torch.empty(2, 3, 100, 64, device="cuda", dtype=torch.bfloat16)
        k = v = torch.empty(2, 3, 77, 64, device="cuda", dtype=torch.bfloat16)
        assert kernels._pick(q.device, q.dtype) == (kernels._cuda_forward, kernels._cuda_backward)
        out, lse = kernels.block_forward(q, k, v, 0.125)
        assert out.shape == q.shape and lse.shape == (2, 3, 100) and lse.dtype == torch.float32
        grads = kernels.block_backward(torch.empty_like(out), q, k, v, out, lse, 0.125)[:3]
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


class HostCopies(TorchDispatchMode):
    """Counts what stalls a GPU: reading a value (`.item()`, `bool()`) and copies from the device to the host (each
    answered with a stand-in, since a fake tensor has no value)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.count += 1
            return 4.0
        if (
            func is aten._to_copy.default
            and args[0].device.type == "cuda"
            and kwargs.get("device") == torch.device("cpu")
        ):
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("n", [1, 12])
def test_grad_norm_copies_to_the_host_once_per_step(n):
    """global_grad_norm accumulates on the device: one host copy per call, however many parameters."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = [torch.empty(5, 7, device="cuda", requires_grad=True) for _ in range(n)]
        for p in params:
            p.grad = torch.empty(5, 7, device="cuda")
        with HostCopies() as copies:
            assert global_grad_norm(params) == 2.0  # sqrt of the stand-in 4.0
    assert copies.count == 1


def test_grad_norm_value_on_cpu():
    """The same accumulation's value: the norm of every gradient together, float64, any dtypes mixed."""
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.zeros(s, dtype=dt) for s, dt in (((3, 4), torch.float64), ((5,), torch.float32), ((0,), torch.float32))
    ]
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    want = torch.cat([g.double().flatten() for g in grads]).norm().item()
    assert global_grad_norm(params) == pytest.approx(want, rel=1e-12)
    params[1].grad[0] = float("nan")
    assert global_grad_norm(params) != global_grad_norm(params)  # NaN
    assert global_grad_norm([torch.zeros(2)]) == 0.0  # no gradients at all
