# The files of one checkpoint directory: a manifest (size + sha256 of every file, hashed by the rank that wrote it
# and verified on load, shared across ranks), a DCP reader that unpickles its .metadata with an allow-list (DCP
# itself uses plain pickle.load), and a writer that can inject an I/O error for the fault tests.
from __future__ import annotations

import errno
import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

MANIFEST = "manifest.json"
META = "meta.json"
_PART = ".manifest.rank{}.json"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest_part(directory: Path, rank: int) -> None:
    """Hash the files this rank wrote (DCP names them __<rank>_*; rank 0 also owns .metadata)."""
    mine = sorted(directory.glob(f"__{rank}_*"))
    if rank == 0:
        mine += [p for p in (directory / ".metadata",) if p.is_file()]
    entries = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in mine}
    (directory / _PART.format(rank)).write_text(json.dumps(entries))


def merge_manifest(directory: Path, world_size: int) -> None:
    """Rank 0: join the ranks' parts; hash whatever no rank claimed; write manifest.json."""
    files: dict[str, dict] = {}
    for r in range(world_size):
        part = directory / _PART.format(r)
        files.update(json.loads(part.read_text()))
        part.unlink()
    for p in directory.iterdir():
        if p.is_file() and p.name not in files and p.name not in (MANIFEST, META):
            files[p.name] = {"size": p.stat().st_size, "sha256": sha256(p)}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def verify_files(directory: Path, rank: int, world_size: int) -> list[str]:
    """This rank's share of the manifest check (every world_size-th file); returns the problems found."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{directory / MANIFEST}: missing or unreadable ({err})"]
    problems = []
    for i, (name, want) in enumerate(sorted(files.items())):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {want['size']}")
        elif i % world_size == rank and sha256(path) != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt)")
    return problems


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes DCP puts into .metadata: its metadata dataclasses, torch.Size, dtypes and layouts."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _EXACT = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    _PATHS = {("pathlib", n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        elif (module, name) in self._EXACT | self._PATHS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which cpdit does not load")


class SafeReader(FileSystemReader):
    """FileSystemReader whose .metadata goes through an allow-list unpickler; tensors load with weights_only."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class FailingWriter(FileSystemWriter):
    """Testing aid (debug.fail_save=io_error): writes nothing and fails like a full disk."""

    def write_data(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device (injected by debug.fail_save)", str(self.path))
