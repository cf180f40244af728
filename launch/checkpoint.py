# Checkpoints with torch.distributed.checkpoint (DCP): every rank writes its shards into `step_XXXXXXX.tmp/`, rank 0
# adds meta.json and renames the directory once all ranks are done, so a crash mid-save never touches the last
# complete checkpoint. DCP stores global tensors, so a checkpoint loads under any (dp, cp, tp) layout.
#
# Nothing is unpickled: DCP's metadata is written by us, model/optimizer/EMA tensors are plain tensors, and the
# run state (step, data position, counters) is JSON. RNG needs no state: every random draw is seeded from
# (seed, data-parallel rank, step), so a resumed run draws the same numbers.
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

META = "meta.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed, with meta.json), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")]
    return sorted((p for p in done if (p / META).is_file()), key=lambda p: p.name)


def find_resume(root: Path, resume: str) -> Path | None:
    """`auto`: newest complete checkpoint under root (None if none); `none`; or an explicit directory."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {META})")
    return path


def _state(model: torch.nn.Module, optimizer, ema: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(strict=True))
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    return state


def save(
    root: Path, step: int, model, optimizer, ema, meta: dict, keep_last: int, fail_after_write: bool = False
) -> Path:
    """Collective: every rank must call. Returns the final directory."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_state(model, optimizer, ema), checkpoint_id=str(tmp))
    if fail_after_write:  # testing aid: a crash after the shards are written, before the rename
        raise RuntimeError(f"injected failure while saving {tmp}")
    dist.barrier()
    if rank == 0:
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optimizer, ema) -> dict:
    """Collective: load into the current (possibly differently parallelized) model, optimizer and EMA."""
    state = _state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / META).read_text())
