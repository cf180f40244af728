# The samplers against an exact answer. For Gaussian data x0 ~ N(mu, s^2 I) the posterior mean, hence the exact
# v-prediction, is analytic, and the probability-flow ODE maps pure noise z to x_t = a mu + sqrt(a^2 s^2 + sigma^2) z
# at every timestep; `sample` returns the denoised x0 at the last index. DDIM must converge to it at first order and
# DPM-Solver++(2M) at second order in the number of steps. Classifier-free guidance of two such Gaussians (same s,
# means mu_c and mu_u) is the exact v of N(mu_u + w (mu_c - mu_u), s^2), so guided sampling has an exact answer too.
import math

import pytest
import torch

from cpdit.diffusion import Schedule, cfg_denoiser, dynamic_cfg_scale, sample, sampling_indices

SCHEDULE = Schedule.zero_snr(1000, 3.0)


def gaussian_v(mu: torch.Tensor, s: float):
    """Exact E[v | x_t] for x0 ~ N(mu, s^2): x0_hat = mu + k (x_t - a mu), k = a s^2 / (a^2 s^2 + sigma^2),
    v_hat = (a x_t - x0_hat) / sigma (from v = a eps - sigma x0, x_t = a x0 + sigma eps, a^2 + sigma^2 = 1)."""

    def v(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = SCHEDULE.sqrt_alpha_bar[idx].double().view(-1, *([1] * (x.dim() - 1)))
        sigma = (1 - a**2).sqrt()
        x0_hat = mu + a * s**2 / (a**2 * s**2 + sigma**2) * (x - a * mu)
        return (a * x - x0_hat) / sigma

    return v


END = 100  # the grids end here: uniform refinements then shrink every log-SNR step alike (a grid ending at index 0
# keeps one last step whose log-SNR jump shrinks only logarithmically with the step count, hiding the order)


def grid(steps: int) -> list[int]:
    return torch.linspace(999, END, steps + 1).round().long().tolist()


def exact_sample(z: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """The probability-flow solution from noise z at zero SNR to index END, denoised there."""
    a = SCHEDULE.sqrt_alpha_bar[END].double()
    sigma2 = 1 - a**2
    x_t = a * mu + (a**2 * s**2 + sigma2).sqrt() * z
    return mu + a * s**2 / (a**2 * s**2 + sigma2) * (x_t - a * mu)


def error(sampler: str, steps: int, mu, s, z, denoise=None) -> float:
    out = sample(denoise or gaussian_v(mu, s), z, SCHEDULE, steps, sampler, indices=grid(steps))
    return (out - exact_sample(z, mu, s)).abs().max().item()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 2, 5, 5, generator=g, dtype=torch.float64)
    mu = torch.linspace(-0.8, 0.6, 5, dtype=torch.float64).view(1, 1, 1, 1, 5)
    return z, mu, 0.3


@pytest.mark.parametrize(("sampler", "order"), [("ddim", 1), ("dpmpp_2m", 2)])
def test_sampler_converges_to_the_probability_flow_solution_at_its_order(problem, sampler, order):
    z, mu, s = problem
    errs = [error(sampler, n, mu, s, z) for n in (10, 20, 40, 80)]
    rates = [math.log2(e0 / e1) for e0, e1 in zip(errs, errs[1:], strict=False)]  # measured: ddim 0.96-0.99,
    assert all(order - 0.2 < r < order + 0.3 for r in rates), (sampler, errs, rates)  # dpmpp_2m 1.86-1.97


def test_dpmpp_2m_beats_ddim_at_equal_steps(problem):
    z, mu, s = problem
    assert error("dpmpp_2m", 40, mu, s, z) < 0.1 * error("ddim", 40, mu, s, z)


def test_default_grid_ends_at_the_clean_index(problem):
    z, mu, s = problem
    out = sample(gaussian_v(mu, s), z, SCHEDULE, 25, "dpmpp_2m")
    assert sampling_indices(25)[0] == 999 and sampling_indices(25)[-1] == 0
    a = SCHEDULE.sqrt_alpha_bar[0].double()  # the probability-flow solution at index 0, denoised there
    x0 = mu + a * s**2 / (a**2 * s**2 + 1 - a**2) * (a * mu + (a**2 * s**2 + 1 - a**2).sqrt() * z - a * mu)
    assert (out - x0).abs().max() < 0.1


def test_classifier_free_guidance_samples_the_guided_gaussian(problem):
    z, mu_c, s = problem
    mu_u = torch.zeros_like(mu_c) + 0.2
    w = 3.0
    v_c, v_u = gaussian_v(mu_c, s), gaussian_v(mu_u, s)
    denoise = cfg_denoiser(lambda x, idx: (v_c(x, idx), v_u(x, idx)), w, 80, dynamic=False)
    mu_w = mu_u + w * (mu_c - mu_u)
    assert error("dpmpp_2m", 80, mu_w, s, z, denoise) < 1e-4  # the unguided problem: 4.3e-5 at 80 steps


def test_dynamic_cfg_follows_cogvideox_ramp():
    n, scale = 50, 6.0
    for i in range(n):
        p = i / (n - 1)
        assert dynamic_cfg_scale(scale, i, n) == pytest.approx(1 + scale * (1 - math.cos(math.pi * p**5)) / 2)
    assert dynamic_cfg_scale(scale, 0, n) == 1.0 and dynamic_cfg_scale(scale, n - 1, n) == pytest.approx(1 + scale)
    seen = []
    steps = len(sampling_indices(n))

    def predict(x, idx):
        return torch.ones_like(x), torch.zeros_like(x)  # v_c - v_u = 1: the guided v IS the guidance weight

    denoise = cfg_denoiser(predict, scale, steps, dynamic=True)
    for _ in range(2 * steps):  # two trajectories (e.g. two frames generated in order): the ramp restarts
        seen.append(denoise(torch.zeros(1), torch.zeros(1, dtype=torch.long)).item())
    want = [dynamic_cfg_scale(scale, i % steps, steps) for i in range(2 * steps)]
    assert seen == pytest.approx(want)
