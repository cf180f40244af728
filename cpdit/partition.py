# How a count is split over holders, written once: frames over context-parallel ranks (the DiT's sequence, the VAE's
# time axis, the factorized family's axis switch), heads over Ulysses ranks and ring passes, spatial tokens over the
# ranks of an axis switch. Pure functions: parallel/ and cpdit/vae/ call them with their group sizes.
from __future__ import annotations

Segment = tuple[int, int]  # global frames [start, end)


def even_split(n: int, parts: int) -> list[int]:
    """`n` items over `parts` holders as evenly as possible, earlier holders taking the remainder (13 on 4 ->
    4, 3, 3, 3)."""
    return [n // parts + (r < n % parts) for r in range(parts)]


def split_ranges(n: int, parts: int) -> list[Segment]:
    """The [start, end) ranges of `even_split`, in order."""
    sizes = even_split(n, parts)
    starts = [sum(sizes[:r]) for r in range(parts)]
    return [(a, a + k) for a, k in zip(starts, sizes, strict=True)]


def frame_partition(num_frames: int, cp_size: int, layout: str = "contiguous") -> list[list[Segment]]:
    """Frames of each cp rank as ordered global ranges. 13 frames on 4 ranks: contiguous -> 4,3,3,3 frames;
    zigzag -> rank r gets chunks r and 2*cp-1-r of 2*cp near-equal chunks (balanced frame-causal work)."""
    if num_frames < cp_size:
        raise ValueError(
            f"num_frames={num_frames} < cp_size={cp_size}: every context-parallel rank needs at least one "
            f"(latent) frame; lower cp_size or use more frames"
        )
    if layout == "contiguous":
        return [[s] for s in split_ranges(num_frames, cp_size)]
    if layout == "zigzag":
        c = 2 * cp_size
        chunks = split_ranges(num_frames, c)
        return [[s for s in (chunks[r], chunks[c - 1 - r]) if s[1] > s[0]] for r in range(cp_size)]
    raise ValueError(f"layout={layout!r} is not 'contiguous' or 'zigzag'")
