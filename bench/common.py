# Shared by the benchmarks: per-process memory from /proc (RSS follows live memory when glibc is told to mmap
# large blocks, see MALLOC_ENV).
from __future__ import annotations

import statistics
from pathlib import Path

# Large allocations straight from mmap and back on free (no dynamic threshold, no heap caching), so that RSS
# follows live memory and a peak-RSS working set is meaningful. glibc reads these when a process starts.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


# Repeats: every bench keeps each repeat's time (the slowest rank's); tables show median [min-max], ratios carry
# their range, and a target counts as met only when its whole range clears it.


def spread(ts: list[float]) -> str:
    return f"{statistics.median(ts):.3f} [{min(ts):.3f}-{max(ts):.3f}]"


def ratio(base: list[float], ts: list[float]) -> tuple[float, float, float]:
    """base / ts: the median ratio and its range over the repeats (slowest-vs-fastest to fastest-vs-slowest)."""
    return statistics.median(base) / statistics.median(ts), min(base) / max(ts), max(base) / min(ts)


def fmt_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]"


def verdict(r: tuple[float, float, float], target: float, at_most: bool = False) -> str:
    """A target is met only when the whole range of the ratio clears it, missed when none of it does."""
    lo, hi = (-r[2], -r[1]) if at_most else (r[1], r[2])
    t = -target if at_most else target
    return "met" if lo >= t else ("not met" if hi < t else "within the spread (undecided)")
