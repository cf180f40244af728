# Shared by the benchmarks: per-process memory from /proc (RSS follows live memory when glibc is told to mmap
# large blocks, see MALLOC_ENV).
from __future__ import annotations

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
