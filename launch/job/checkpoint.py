# Checkpoints with torch.distributed.checkpoint (DCP). Every rank writes its shards into `step_XXXXXXXX.tmp/` and
# hashes them; rank 0 adds manifest.json (sizes + sha256) and meta.json, then renames the directory. The ranks
# agree after each stage with a one-integer all-reduce, so a failure on one rank (disk full, I/O error) fails the
# save on all of them, the previous complete checkpoint is untouched and the error names what happened. DCP stores
# global tensors, so a checkpoint loads under any (dp, cp, tp) layout.
#
# Loading verifies the manifest (each rank hashes a share of the files), refuses a checkpoint written for another
# model architecture with the differing fields named, never unpickles anything but DCP's exact metadata classes,
# decodes non-tensor entries with weights_only=True and reads no file outside the checkpoint (launch/job/ckpt_files.py).
# The run state (step, data position, counters, loss scale) is JSON. RNG needs no state: every random draw is
# seeded from (seed, data-parallel rank, step, sample index), so a resumed run draws the same numbers.
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from launch.job.ckpt_files import (
    META,
    CheckpointRefused,
    FailingWriter,
    SafeLoadPlanner,
    SafeReader,
    merge_manifest,
    read_metadata,
    verify_files,
    write_manifest_part,
)
from parallel.comm import agree
from parallel.progress import in_collective


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed, with meta.json), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")]
    return sorted((p for p in done if (p / META).is_file()), key=lambda p: p.name)


def find_resume(root: Path, resume: str) -> Path | None:
    """`auto`: newest complete checkpoint under root (None if none); `none`; or an explicit directory. (The
    distributed `select_resume` also verifies it.)"""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {META})")
    return path


def _all_ok(ok: bool, what: str) -> bool:
    return bool(agree([ok], "min", f"checkpoint {what} ok")[0])


def _state(model: torch.nn.Module, optimizer, ema: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(strict=True))
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema
    return state


def save(
    root: Path,
    step: int,
    model,
    optimizer,
    ema,
    meta: dict,
    keep_last: int,
    inject: str | None = None,
    inject_rank: int = 0,
) -> Path:
    """Collective: every rank must call. Returns the final directory. `inject` (testing aid): 'crash' raises on
    every rank after the shards are written; 'io_error' makes rank `inject_rank`'s write fail like a full disk."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank, world = dist.get_rank(), dist.get_world_size()
    previous = complete_checkpoints(root)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    stage, error = "prepare", None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        if not _all_ok(True, stage):
            raise CheckpointError("rank 0 could not prepare the directory")
        stage = "write"
        writer_cls = FailingWriter if inject == "io_error" and rank == inject_rank else FileSystemWriter
        dcp.save(_state(model, optimizer, ema), storage_writer=writer_cls(str(tmp)))
        if inject == "crash":
            raise RuntimeError(f"injected failure while saving {tmp} (debug.fail_save_at_step)")
        stage = "hash"
        try:
            write_manifest_part(tmp, rank)
        except OSError as err:
            error = err
        if not _all_ok(error is None, stage):
            raise CheckpointError(str(error) if error else "another rank failed to hash its shards")
        stage = "finalize"
        if rank == 0:
            try:
                merge_manifest(tmp, world)
                (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=1))
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            except OSError as err:
                error = err
        if not _all_ok(error is None, stage):
            raise CheckpointError(str(error) if error else "rank 0 failed to finalize the checkpoint")
    except (RuntimeError, CheckpointException) as err:
        if inject == "crash" and not isinstance(err, CheckpointException):
            raise
        if isinstance(err, CheckpointException):
            err = "; ".join(f"rank {r}: {failure[0]!r}" for r, failure in sorted(err.failures.items()))
        raise CheckpointError(
            f"saving checkpoint step {step} to {tmp} failed ({stage}): {err}; {kept}. Fix the cause (disk space, "
            "permissions) and rerun: checkpoint.resume=auto continues from the last complete checkpoint."
        ) from None
    except OSError as err:
        raise CheckpointError(f"saving checkpoint step {step} to {tmp} failed ({stage}): {err}; {kept}") from err
    if rank == 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _all_ok(True, "rotate")
    return final


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / META}: unreadable ({err})") from None


def architecture_mismatch(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    differ = [k for k in keys if saved.get(k) != current.get(k)]
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in differ]


def _verify(path: Path) -> list[str]:
    """Collective: every rank checks its share of the manifest; returns all problems (same list on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = verify_files(path, rank, world)
    found: list[list[str]] = [[] for _ in range(world)]
    with in_collective("all_gather_object(checkpoint verification)"):
        dist.all_gather_object(found, mine)
    return [p for part in found for p in part]


def select_resume(root: Path, resume: str, architecture: dict) -> Path | None:
    """Collective. The checkpoint to resume from, verified against its manifest and this run's architecture.
    `auto` falls back to older checkpoints past a corrupt one (with a warning) and starts fresh when there is
    none; an explicit path must verify."""
    if resume == "none":
        return None
    candidates = [find_resume(root, resume)] if resume != "auto" else complete_checkpoints(root)[::-1]
    corrupt = []
    for path in candidates:
        if path is None:
            continue
        meta = read_meta(path)
        mismatch = architecture_mismatch(meta["architecture"], architecture) if "architecture" in meta else []
        if mismatch:
            raise CheckpointError(
                f"checkpoint {path} was written for another model ({'; '.join(mismatch)}). Resume with the model "
                "settings it was trained with, or start a new run (another train.run_name, or checkpoint.resume=none)"
            )
        problems = _verify(path)
        if not problems:
            return path
        if resume != "auto":
            raise CheckpointError(f"checkpoint.resume={resume!r} failed verification: {'; '.join(problems)}")
        corrupt.append(path)
        if dist.get_rank() == 0:
            print(f"cpdit: skipping corrupt checkpoint {path}: {'; '.join(problems)}", file=sys.stderr, flush=True)
    if corrupt:
        raise CheckpointError(
            f"every checkpoint under {root} failed verification ({', '.join(p.name for p in corrupt)}); nothing was "
            "deleted. Move them away, or set checkpoint.resume=none to start over"
        )
    return None


def _causes(err: CheckpointException) -> list[BaseException]:
    """The per-rank exceptions DCP gathered (`failures` maps rank -> (exception, traceback))."""
    return [pair[0] if isinstance(pair, tuple) else pair for pair in err.failures.values()]


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    """A nested state dict -> {dotted key: leaf}, the key names DCP's metadata uses."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list | tuple):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def dump_full_state(path: Path, model, optimizer, ema) -> None:
    """Collective (testing aid, debug.dump_resumed_state): every tensor of the model, optimizer and EMA state as
    this layout holds it, unsharded, under DCP's key names; rank 0 writes them to `path` (safetensors)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    flat = _flat(_state(model, optimizer, ema))
    full = {}
    for key in sorted(flat):  # the same order on every rank: full_tensor() is a collective
        value = flat[key]
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor):
            full[key] = value.detach().cpu().contiguous()
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(full, str(path))
    dist.barrier()


def read_full_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, read in this process without a process group (for tests and tools;
    through the same safe reader as `load`)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path)
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
    return state


def load(path: Path, model, optimizer, ema) -> dict:
    """Collective: load into the current (possibly differently parallelized) model, optimizer and EMA."""
    state = _state(model, optimizer, ema)
    read_metadata(path)  # every rank, before any collective: a refused checkpoint fails all of them alike, no hang
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointException as err:
        refused = [e for e in _causes(err) if isinstance(e, CheckpointRefused)]
        if refused:
            raise CheckpointError(f"checkpoint {path}: {refused[0]}") from None
        raise
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_meta(path)
