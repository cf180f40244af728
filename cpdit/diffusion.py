# CogVideoX's diffusion objective and samplers (single-device math; no ranks here).
#
# Discretization (SAT ZeroSNRDDPMDiscretization): a DDPM beta schedule linear in sqrt(beta), the SNR shifted by
# `shift_scale` (alpha_bar / (s + (1 - s) alpha_bar)), then sqrt(alpha_bar) rescaled so the last step has zero SNR
# (Lin et al. 2023, https://arxiv.org/abs/2305.08891). Training (SAT VideoDiffusionLoss + VideoScaling):
#   x_t = a x_0 + s eps,  a = sqrt(alpha_bar_t), s = sqrt(1 - a^2),  the network predicts v = a eps - s x_0,
#   x0_hat = a x_t - s v_hat,  loss = mean(w (x0_hat - x_0)^2), w = 1 / (1 - a^2)   (= mean((v_hat - v)^2)).
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """sqrt(alpha_bar) per timestep index 0..num_idx-1 (index 0: almost clean, last: pure noise)."""

    sqrt_alpha_bar: torch.Tensor  # (num_idx,) float64

    @classmethod
    def zero_snr(
        cls, num_idx: int = 1000, shift_scale: float = 3.0, linear_start: float = 0.00085, linear_end: float = 0.012
    ) -> Schedule:
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_idx, dtype=torch.float64) ** 2
        alpha_bar = torch.cumprod(1.0 - betas, 0)
        alpha_bar = alpha_bar / (shift_scale + (1 - shift_scale) * alpha_bar)  # SNR shift
        a = alpha_bar.sqrt()
        a0, aT = a[0].clone(), a[-1].clone()
        a = (a - aT) * (a0 / (a0 - aT))  # zero terminal SNR, first step unchanged
        return cls(a)

    @property
    def num_idx(self) -> int:
        return self.sqrt_alpha_bar.numel()

    def alpha(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sqrt_alpha_bar.to(idx.device)[idx]


def sample_timesteps(batch: int, num_idx: int, dp_rank: int, dp_size: int, gen: torch.Generator) -> torch.Tensor:
    """SAT's uniform DiscreteSampling: the index range is split into groups of data-parallel ranks so that one
    global batch covers the whole range evenly; each rank draws uniformly inside its group's slice."""
    i = 1
    while dp_size % i or num_idx % (dp_size // i):
        i += 1
    groups = dp_size // i
    width = num_idx // groups
    g = dp_rank // (dp_size // groups)
    return torch.randint(g * width, (g + 1) * width, (batch,), generator=gen)


def _expand(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) or per-frame (B, T) coefficients -> broadcastable to x (B, T, ...)."""
    return a.view(*a.shape, *([1] * (x.dim() - a.dim())))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a: sqrt(alpha_bar) per sample (B,) or per frame (B, T)."""
    a = _expand(a, x0).to(x0.dtype)
    return a * x0 + (1 - a**2).sqrt() * noise


def v_loss_terms(v_pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-element weighted error w (x0_hat - x0)^2 of a v-prediction (any shape with batch first; `a` per sample
    (B,) or per frame (B, T))."""
    a = _expand(a, x0).to(torch.float32)
    s2 = (1 - a**2).clamp_min(1e-12)
    x0_hat = a * x_t.float() - s2.sqrt() * v_pred.float()
    return (x0_hat - x0.float()) ** 2 / s2


def sampling_indices(num_steps: int, num_idx: int = 1000) -> list[int]:
    """Roughly equally spaced timestep indices from the noisiest down to 0."""
    steps = torch.linspace(num_idx - 1, 0, num_steps).round().long().tolist()
    return list(dict.fromkeys(steps))


def dynamic_cfg_scale(scale: float, step: int, num_steps: int) -> float:
    """CogVideoX's dynamic CFG (SAT guiders.DynamicCFG, exp=5): w = 1 + scale (1 - cos(pi p^5)) / 2 with p the
    progress along the trajectory, here step / (num_steps - 1): 1 at the first (noisiest) step, 1 + scale at the last.
    (SAT derives p from `num_steps - timestep`, mixing a step count with a timestep value; its forks fix that to
    the sampling step, as here.)"""
    p = step / max(num_steps - 1, 1)
    return 1.0 + scale * (1.0 - math.cos(math.pi * p**5.0)) / 2.0


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, idx (B,)) -> v_hat


def cfg_denoiser(
    predict: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    num_steps: int,
    dynamic: bool = True,
) -> Denoise:
    """Classifier-free guidance: v = v_u + w (v_c - v_u) from `predict(x, idx) -> (v_c, v_u)`, the conditional and
    unconditional predictions. w = `scale`, or with `dynamic` CogVideoX's ramp `dynamic_cfg_scale(scale, i, n)` where
    i counts the calls modulo `num_steps` (the position along one trajectory; also per frame when a frame-causal model
    generates frames one after the other)."""
    calls = 0

    def denoise(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        v_c, v_u = predict(x, idx)
        w = dynamic_cfg_scale(scale, calls % num_steps, num_steps) if dynamic else scale
        calls += 1
        return v_u + w * (v_c - v_u)

    return denoise


@torch.no_grad()
def sample(
    denoise: Denoise,
    noise: torch.Tensor,
    schedule: Schedule,
    num_steps: int,
    sampler: str = "dpmpp_2m",
    indices: list[int] | None = None,
) -> torch.Tensor:
    """Generate x_0 from `noise` with DDIM (eta = 0) or DPM-Solver++(2M) in the data-prediction form
    (Lu et al. 2022, https://arxiv.org/abs/2211.01095). `denoise` returns the (guided) v prediction. The timestep
    indices visited are `sampling_indices(num_steps)` or the decreasing `indices` given; the result is the
    denoised prediction at the last of them."""
    if sampler not in ("ddim", "dpmpp_2m"):
        raise ValueError(f"sample.sampler={sampler!r} is not 'ddim' or 'dpmpp_2m'")
    x = noise.double()
    idx = list(indices) if indices is not None else sampling_indices(num_steps, schedule.num_idx)
    a_all = schedule.sqrt_alpha_bar.double()
    x0_prev, h_prev = None, None
    for i, t in enumerate(idx):
        a, s = a_all[t], (1 - a_all[t] ** 2).sqrt()
        v = denoise(x.to(noise.dtype), torch.full((x.shape[0],), t, dtype=torch.long)).double()
        x0 = a * x - s * v
        eps = s * x + a * v
        if i + 1 == len(idx):
            return x0.to(noise.dtype)
        a_n = a_all[idx[i + 1]]
        s_n = (1 - a_n**2).sqrt()
        if sampler == "ddim" or a == 0 or x0_prev is None:  # first step (and zero SNR, log-SNR -inf): DDIM
            x_next = a_n * x0 + s_n * eps
            h = None if a == 0 else torch.log(a_n / s_n) - torch.log(a / s)
        else:
            h = torch.log(a_n / s_n) - torch.log(a / s)
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x_next = (s_n / s) * x - a_n * torch.expm1(-h) * d
        x0_prev, h_prev, x = x0, h, x_next
        if h_prev is None:
            x0_prev = None  # the zero-SNR step gives no usable multistep history
    return x.to(noise.dtype)


def per_frame_timesteps(batch: int, frames: int, num_idx: int, dp_rank: int, dp_size: int, gen) -> torch.Tensor:
    """Independent noise levels per frame (B, T) for the frame-causal objective (each frame is denoised given past
    frames at any noise level: "diffusion forcing", Chen et al. 2024, https://arxiv.org/abs/2407.01392)."""
    return sample_timesteps(batch * frames, num_idx, dp_rank, dp_size, gen).view(batch, frames)


@torch.no_grad()
def sample_frames_in_order(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    schedule: Schedule,
    num_steps: int,
    sampler: str = "dpmpp_2m",
) -> torch.Tensor:
    """Generate the frames of a frame-causal model one after the other: frame t runs the whole sampler with the
    frames before it fixed at their generated values (timestep 0) and the frames after it left as pure noise at the
    last timestep, which a frame-causal model cannot see. `denoise(x (B, T, ...), idx (B, T)) -> v (B, T, ...)`."""
    x = noise.clone()
    B, T = noise.shape[:2]
    last = schedule.num_idx - 1
    for t in range(T):

        def frame_denoise(x_t: torch.Tensor, idx: torch.Tensor, t: int = t) -> torch.Tensor:
            full = x.clone()
            full[:, t] = x_t[:, 0]
            steps = torch.full((B, T), last, dtype=torch.long)
            steps[:, :t] = 0
            steps[:, t] = idx
            return denoise(full, steps)[:, t : t + 1]

        x[:, t : t + 1] = sample(frame_denoise, noise[:, t : t + 1], schedule, num_steps, sampler)
    return x
