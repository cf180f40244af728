# Root cause of a failed job, for the one-line summary `cpdit-launch` ends with. A rank whose job raises writes
# <run>/errors/rank<N>.json (time, exception type, first line of the message) before it dies; torchrun's own report
# names whichever rank exited first, often a peer that only saw "Connection closed by peer". The launcher picks
# the earliest record written during this launch.
from __future__ import annotations

import json
import time
from pathlib import Path

ERRORS = "errors"


def record(run_dir: Path, rank: int, err: BaseException) -> None:
    """Called by a rank whose job raised (best effort: a failure to write is ignored)."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    try:
        (run_dir / ERRORS).mkdir(parents=True, exist_ok=True)
        entry = {"time": time.time(), "rank": rank, "type": type(err).__name__, "message": message[:500]}
        (run_dir / ERRORS / f"rank{rank}.json").write_text(json.dumps(entry))
    except OSError:
        pass


def root_cause(run_dir: Path, since: float) -> str | None:
    """'rank R raised Type: message' for the earliest error recorded at or after `since`, with how many ranks
    recorded one; None if none did."""
    entries = []
    for path in sorted((run_dir / ERRORS).glob("rank*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("time", 0) >= since:
            entries.append(entry)
    if not entries:
        return None
    first = min(entries, key=lambda e: e["time"])
    others = f" (first of {len(entries)} ranks that raised)" if len(entries) > 1 else ""
    return f"rank {first['rank']} raised {first['type']}: {first['message']}{others}"
