# Sample videos out: mp4 (imageio-ffmpeg), gif and a frame-grid PNG. Frames (F, 3, H, W) in [-1, 1].
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor, min_size: int = 128) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H', W', 3) uint8, nearest-upscaled so small clips stay visible and the
    encoder's 16-pixel macroblocks fit."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    scale = max(1, -(-min_size // max(frames.shape[-2:])))
    frames = frames.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    h, w = frames.shape[-2:]
    frames = frames[..., : h - h % 16 or h, : w - w % 16 or w]
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def write_video(video: torch.Tensor, stem: Path, fps: float = 8.0) -> list[Path]:
    """Writes stem.mp4, stem.gif and stem.png (frame grid); returns the paths."""
    import imageio.v2 as imageio

    frames = to_uint8(video)
    stem.parent.mkdir(parents=True, exist_ok=True)
    mp4, gif, png = stem.with_suffix(".mp4"), stem.with_suffix(".gif"), stem.with_suffix(".png")
    imageio.mimwrite(str(mp4), list(frames), fps=fps, codec="libx264", macro_block_size=16, quality=8)
    imageio.mimwrite(str(gif), list(frames), duration=1000 / fps, loop=0)
    imageio.imwrite(str(png), np.concatenate(list(frames), axis=1))
    return [mp4, gif, png]
