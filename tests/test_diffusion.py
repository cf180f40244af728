# The diffusion objective and samplers, single process.
import pytest
import torch

from cpdit.diffusion import (
    Schedule,
    add_noise,
    dynamic_cfg_scale,
    sample,
    sample_timesteps,
    sampling_indices,
    v_loss_terms,
)


def test_zero_snr_schedule():
    s = Schedule.zero_snr(1000, shift_scale=3.0)
    a = s.sqrt_alpha_bar
    assert a.shape == (1000,) and a[-1] == 0.0  # zero terminal SNR
    assert torch.all(a[1:] < a[:-1])  # monotone
    beta0 = 0.00085
    assert a[0].item() == pytest.approx(((1 - beta0) / (3.0 + (1 - 3.0) * (1 - beta0))) ** 0.5, rel=1e-12)


def test_v_loss_equals_v_mse():
    gen = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(3, 2, 4, 5, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    a = torch.tensor([0.0, 0.5, 0.99], dtype=torch.float64)
    x_t = add_noise(x0, eps, a)
    s = (1 - a**2).sqrt().view(-1, 1, 1, 1, 1)
    v = a.view(-1, 1, 1, 1, 1) * eps - s * x0
    torch.testing.assert_close(v_loss_terms(v_hat, x_t, x0, a).double(), (v_hat - v) ** 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_sampler_recovers_x0_with_an_oracle(sampler):
    sched = Schedule.zero_snr()
    x0 = torch.randn(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def oracle(x, idx):  # the exact v for the trajectory that ends at x0
        a = sched.alpha(idx).double().view(-1, 1, 1, 1, 1)
        s = (1 - a**2).sqrt()
        eps = (x - a * x0) / s.clamp_min(1e-12)
        return a * eps - s * x0

    noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = sample(oracle, noise, sched, num_steps=12, sampler=sampler)
    torch.testing.assert_close(out, x0, rtol=1e-7, atol=1e-7)
    with pytest.raises(ValueError, match="sample.sampler='euler'"):
        sample(oracle, noise, sched, 3, "euler")


def test_timestep_stratification_and_helpers():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_timesteps(64, 1000, r, 4, gen) for r in range(4)]
    for r, d in enumerate(draws):  # each of 4 data-parallel ranks covers its quarter of the range
        assert d.min() >= 250 * r and d.max() < 250 * (r + 1)
    assert sample_timesteps(8, 1000, 0, 3, gen).max() < 1000  # 3 does not divide 1000: one group
    idx = sampling_indices(25)
    assert idx[0] == 999 and idx[-1] == 0 and len(idx) == 25
    assert dynamic_cfg_scale(6.0, 0, 25) == 1.0 and dynamic_cfg_scale(6.0, 24, 25) == pytest.approx(7.0)
