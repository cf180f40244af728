# Timestep, patch and positional embeddings of CogVideoX, computed from explicit frame/row/column ids so that a
# context-parallel rank computes exactly its own tokens' positions.
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (B,) -> (B, dim), as diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(emb), torch.sin(emb)] if flip_sin_to_cos else [torch.sin(emb), torch.cos(emb)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Patchify of the frames and a linear projection of the text embeddings. CogVideoX 1.0: a Conv2d over each
    frame; with `patch_size_t` (CogVideoX 1.5): a Linear over (patch_size_t x p x p) patches of consecutive frames.
    With `learned_rows`, a trained position table `pos_embedding` (rows, hidden) of text + video tokens."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        patch_size: int,
        text_dim: int,
        bias: bool = True,
        patch_size_t: int | None = None,
        learned_rows: int = 0,
    ):
        super().__init__()
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        if patch_size_t is None:
            self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size, bias=bias)
        else:  # features ordered (channel, frame, row, column) of a patch, as diffusers' CogVideoXPatchEmbed
            self.proj = nn.Linear(in_channels * patch_size_t * patch_size * patch_size, hidden)
        self.text_proj = nn.Linear(text_dim, hidden)
        if learned_rows:
            self.pos_embedding = nn.Parameter(torch.zeros(learned_rows, hidden))

    def video(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, T/pt * H/p * W/p, hidden), tokens (patch-)frame-major then row-major."""
        B, T, C, H, W = x.shape
        p = self.patch_size
        if self.patch_size_t is not None:
            patches = rearrange(
                x, "b (t pt) c (h p1) (w p2) -> b (t h w) (c pt p1 p2)", pt=self.patch_size_t, p1=p, p2=p
            )
            return self.proj(patches)
        y = self.proj(x.reshape(B * T, C, H, W))  # (B*T, hidden, H/p, W/p)
        return y.flatten(2).transpose(1, 2).reshape(B, -1, y.shape[1])


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) as [sin | cos] (float64)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    out = torch.outer(pos.double(), 1.0 / 10000**omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_3d(frame_ids: torch.Tensor, h: int, w: int, dim: int, spatial_scale: float, temporal_scale: float):
    """CogVideoX 3D sin-cos embedding of the tokens of `frame_ids` (frames of h x w patches): (T_l * h * w, dim).

    Layout per token: [temporal (dim/4) | spatial: w-coordinate (3dim/8) | h-coordinate (3dim/8)]."""
    dev = frame_ids.device
    rows = torch.arange(h, device=dev, dtype=torch.float32).repeat_interleave(w) / spatial_scale
    cols = torch.arange(w, device=dev, dtype=torch.float32).repeat(h) / spatial_scale
    ds, dt = 3 * dim // 4, dim // 4
    spatial = torch.cat([_sincos_1d(ds // 2, cols), _sincos_1d(ds // 2, rows)], dim=1)  # (h*w, 3dim/4)
    temporal = _sincos_1d(dt, frame_ids.float() / temporal_scale)  # (T_l, dim/4)
    T = frame_ids.numel()
    return torch.cat([temporal.repeat_interleave(h * w, dim=0), spatial.repeat(T, 1)], dim=1).float()  # (T_l*h*w, dim)


def rope_crop_region(h: int, w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """CogVideoX's resize-and-center-crop region of the (h, w) patch grid inside the base grid."""
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rw, rh = base_w, int(round(base_w / w * h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def _linspace_pos(start: float, stop: float, n: int, device) -> torch.Tensor:
    # torch.linspace(start, stop * (n - 1) / n, n), as diffusers' get_3d_rotary_pos_embed builds its grid
    return torch.linspace(start, stop * (n - 1) / n, n, device=device, dtype=torch.float32)


def _rope_1d(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    ang = torch.outer(pos.float(), freqs)
    return ang.cos().repeat_interleave(2, dim=1), ang.sin().repeat_interleave(2, dim=1)


def rope_3d(frame_ids: torch.Tensor, h: int, w: int, head_dim: int, base_h: int, base_w: int, grid: str = "crop"):
    """3D rotary (cos, sin), each (T_l * h * w, head_dim): [time head_dim/4 | rows 3/8 | cols 3/8].

    grid="crop" (CogVideoX 1.0): the (h, w) grid resized and centre-cropped into the (base_h, base_w) one;
    grid="slice" (CogVideoX 1.5, diffusers' grid_type="slice"): rows 0..h-1 and columns 0..w-1."""
    dev = frame_ids.device
    if grid == "crop":
        (top, left), (bottom, right) = rope_crop_region(h, w, base_h, base_w)
        rows, cols = _linspace_pos(top, bottom, h, dev), _linspace_pos(left, right, w, dev)
    elif grid == "slice":
        rows = torch.arange(h, device=dev, dtype=torch.float32)
        cols = torch.arange(w, device=dev, dtype=torch.float32)
    else:
        raise ValueError(f"grid={grid!r} must be 'crop' or 'slice'")
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    t_cos, t_sin = _rope_1d(dim_t, frame_ids.float())
    h_cos, h_sin = _rope_1d(dim_hw, rows)
    w_cos, w_sin = _rope_1d(dim_hw, cols)
    T = frame_ids.numel()

    def combine(t, hh, ww):
        t = t[:, None, None, :].expand(T, h, w, -1)
        hh = hh[None, :, None, :].expand(T, h, w, -1)
        ww = ww[None, None, :, :].expand(T, h, w, -1)
        return torch.cat([t, hh, ww], dim=-1).reshape(T * h * w, -1)

    return combine(t_cos, h_cos, w_cos), combine(t_sin, h_sin, w_sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) with (cos, sin) (S, D): interleaved-pair rotation, computed in fp32 (fp64 for fp64 x)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x_real, x_imag = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)
