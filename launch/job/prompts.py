# What to sample: the prompts (sample.prompts, or sample.prompts_file with one per line) and, for image-to-video
# models, one image per prompt (sample.images in the same order, or `image<TAB>prompt` lines, relative paths from the
# file's directory). Read by the launcher's pre-flight (every path and size checked before any process starts) and
# by the sampling job.
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launch.config import JobConfig


@dataclass(frozen=True)
class Request:
    prompt: str
    image: str | None  # path of the conditioning image (image-to-video), else None


def read_requests(cfg: JobConfig) -> list[Request]:
    """The prompts with their images; ValueError/FileNotFoundError naming the knob when they do not pair up."""
    s = cfg.sample
    if s.prompts_file:
        path = Path(s.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"sample.prompts_file={str(path)!r} does not exist")
        out = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            image, tab, prompt = line.partition("\t")
            out.append(Request(prompt.strip(), _beside(path, image.strip())) if tab else Request(line.strip(), None))
        if s.images:
            raise ValueError("sample.images and sample.prompts_file: give the images in the file (image<TAB>prompt)")
    else:
        images = list(s.images)
        if images and len(images) != len(s.prompts):
            raise ValueError(
                f"sample.images has {len(images)} images for {len(s.prompts)} prompts (sample.prompts): give one "
                "per prompt, in the same order"
            )
        out = [Request(p, images[i] if images else None) for i, p in enumerate(s.prompts)]
    if not out and s.prompts_file:
        raise ValueError(f"sample.prompts_file={s.prompts_file!r} holds no prompt (one per line)")
    if not out:
        raise ValueError("no prompts: set sample.prompts or sample.prompts_file")
    return out


def _beside(prompts_file: Path, image: str) -> str:
    """An image path of a prompts file: relative ones are relative to the file's directory (the file and its
    images travel together), not to where the job was started."""
    return image if Path(image).is_absolute() else str(prompts_file.parent / image)


def read_prompts(cfg: JobConfig) -> list[str]:
    return [r.prompt for r in read_requests(cfg)]


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """An RGB image file -> (3, H, W) in [-1, 1]; ValueError naming the path unless it is height x width."""
    import imageio.v3 as iio

    try:
        pixels = np.asarray(iio.imread(path, plugin="pillow"))  # PNG, JPEG, ... (no guessing through every plugin)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"image {path!r} cannot be read: {type(err).__name__}: {err}") from None
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"image {path!r} has shape {pixels.shape}, not an RGB image")
    if pixels.shape[:2] != (height, width):
        raise ValueError(
            f"image {path!r} is {pixels.shape[1]}x{pixels.shape[0]} (width x height); the clips are "
            f"{width}x{height} (data.width x data.height): resize it to that"
        )
    rgb = torch.from_numpy(pixels[..., :3].astype(np.float32))
    return (rgb.permute(2, 0, 1) / 127.5 - 1.0).contiguous()
