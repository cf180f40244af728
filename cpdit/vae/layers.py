# Layers of the CogVideoX causal 3D VAE (module and parameter names as diffusers' AutoencoderKLCogVideoX, so its
# checkpoints load key for key). Every cross-frame operation goes through the time-axis seam `t` (cpdit/vae/time.py).
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalConv3d(nn.Module):
    """Conv3d, causal in time (k_t - 1 frames of padding in front, from the seam), zero 'same' padding in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_kernel_size = kernel_size
        pad = (kernel_size - 1) // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, pad, pad))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.conv(t.causal_pad(x, self.time_kernel_size))  # (B, C, T, H, W) -> (B, C_out, T, H, W)


class SpatialNorm3D(nn.Module):
    """GroupNorm of f, modulated by the latents zq (resized to f): norm(f) * conv_y(zq) + conv_b(zq)."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=groups, eps=1e-6, affine=True)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, t) -> torch.Tensor:
        if t.first_apart(f) and f.shape[2] > 1:  # the first frame is resized on its own
            z_first = F.interpolate(zq[:, :, :1], size=(1, *f.shape[-2:]))
            z_rest = F.interpolate(zq[:, :, 1:], size=(f.shape[2] - 1, *f.shape[-2:]))
            zq = torch.cat([z_first, z_rest], dim=2)
        else:
            zq = F.interpolate(zq, size=f.shape[-3:])
        return t.group_norm(f, self.norm_layer) * self.conv_y(zq, t) + self.conv_b(zq, t)


class ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, spatial_norm_dim: int | None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        if spatial_norm_dim is None:
            self.norm1 = nn.GroupNorm(num_channels=in_channels, num_groups=groups, eps=eps)
            self.norm2 = nn.GroupNorm(num_channels=out_channels, num_groups=groups, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups)
            self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None, t) -> torch.Tensor:
        return norm(x, zq, t) if zq is not None else t.group_norm(x, norm)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, t) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, zq, t)), t)
        h = self.conv2(F.silu(self._norm(self.norm2, h, zq, t)), t)
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x)
        return x + h


class Downsample3D(nn.Module):
    """2x spatial (stride-2 conv, padded right/bottom), and with compress_time 2x temporal (pairs of frames
    averaged, a leading odd frame kept apart)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor, t) -> tuple[torch.Tensor, object]:
        if self.compress_time:
            B, C, T, H, W = x.shape
            first = t.first_apart(x)
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (x[:, :, :0], x)
            rest = rest.reshape(B, C, rest.shape[2] // 2, 2, H, W).mean(dim=3)  # (B, C, T_rest/2, H, W)
            x, t = torch.cat([head, rest], dim=2), t.halved()
        B, C, T, H, W = x.shape
        y = F.pad(x, (0, 1, 0, 1)).permute(0, 2, 1, 3, 4).reshape(B * T, C, H + 1, W + 1)
        y = self.conv(y)  # (B*T, C, H/2, W/2)
        return y.reshape(B, T, C, *y.shape[-2:]).permute(0, 2, 1, 3, 4), t


class Upsample3D(nn.Module):
    """2x spatial (nearest + conv), and with compress_time 2x temporal (frames repeated, a leading odd frame kept
    single)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor, t) -> tuple[torch.Tensor, object]:
        B, C, T, H, W = x.shape
        if self.compress_time:
            first = t.first_apart(x)
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (x[:, :, :0], x)
            rest = rest.repeat_interleave(2, dim=2)  # nearest in time
            x, t = torch.cat([head, rest], dim=2), t.doubled()
        B, C, T, H, W = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        y = self.conv(F.interpolate(y, scale_factor=2.0))  # (B*T, C, 2H, 2W)
        return y.reshape(B, T, C, *y.shape[-2:]).permute(0, 2, 1, 3, 4), t
