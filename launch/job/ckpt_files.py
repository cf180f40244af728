# The files of one checkpoint directory: a manifest (size + sha256 of every file, hashed by the rank that wrote it
# and verified on load, shared across ranks); a DCP reader that unpickles its .metadata with an allow-list of exact
# classes (DCP itself uses plain pickle.load) and reads only files inside the directory; a load planner that
# decodes non-tensor entries with weights_only=True (DCP's default uses weights_only=False); and a writer that can
# inject an I/O error for the fault tests.
from __future__ import annotations

import errno
import hashlib
import io
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from cpdit.safe_paths import OutsideDirectory, inside

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
        try:
            path = inside(directory, name)  # before anything follows it: a symlink, or a name that leaves the directory
        except OutsideDirectory as err:
            problems.append(str(err))
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {want['size']}")
        elif i % world_size == rank and sha256(path) != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt)")
    return problems


class CheckpointRefused(RuntimeError):
    """A checkpoint file asks for something cpdit never does: run code, or read outside the checkpoint."""


# Exactly what DCP pickles into .metadata (module, qualified name): its metadata dataclasses, the filesystem
# storage record, torch.Size, dtypes and layouts, paths. No dotted names: pickle resolves them as attribute paths,
# which would reach every module an allowed module imports.
_METADATA_CLASSES = {
    *(
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
}
_DTYPES = {n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the exact (module, name) pairs of _METADATA_CLASSES and torch dtypes."""

    def find_class(self, module: str, name: str):
        if "." not in name and ((module, name) in _METADATA_CLASSES or (module == "torch" and name in _DTYPES)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which cpdit does not load")


def read_metadata(directory: Path) -> Metadata:
    """The checkpoint's .metadata through the allow-list, with every storage path a plain file name inside
    `directory`. Raises CheckpointRefused naming the file."""
    path = directory / ".metadata"
    try:
        inside(directory, ".metadata")
    except OutsideDirectory as err:
        raise CheckpointRefused(str(err)) from None
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise CheckpointRefused(f"{path}: refused ({err}); cpdit unpickles DCP's metadata classes only") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointRefused(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    for index, info in (metadata.storage_data or {}).items():
        rel = str(getattr(info, "relative_path", ""))
        if rel in ("", ".", "..") or "/" in rel or "\\" in rel or Path(rel).is_absolute():
            raise CheckpointRefused(
                f"{path}: {getattr(index, 'fqn', index)!r} is stored at {rel!r}, which is not a file name inside "
                f"{directory}; cpdit reads nothing outside the checkpoint directory"
            )
        try:
            inside(directory, rel)  # a plain name can still be a symlink to a file anywhere
        except OutsideDirectory as err:
            raise CheckpointRefused(f"{path}: {getattr(index, 'fqn', index)!r}: {err}") from None
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose .metadata goes through `read_metadata` (allow-list unpickler, storage paths inside
    the checkpoint); tensors load with weights_only (as FileSystemReader does)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner decodes every non-tensor entry with torch.load(weights_only=False), which runs
    whatever the bytes say. Here: an entry this job holds as a tensor but the checkpoint declares as bytes is
    refused, and bytes decode with weights_only=True (plain numbers, strings, lists, dicts, tensors)."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        for fqn, md in (metadata.state_dict_metadata if metadata is not None else {}).items():
            if isinstance(md, BytesStorageMetadata) and isinstance(self.state_dict.get(fqn), torch.Tensor):
                raise CheckpointRefused(f"checkpoint entry {fqn!r} is a tensor here but stored as bytes; refused")

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever it is, it is not plain data
            raise CheckpointRefused(f"checkpoint entry {fqn!r} is not plain data ({type(err).__name__})") from None
        plain = io.BytesIO()  # re-serialised from the plain object: what the default planner then loads is ours
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


class FailingWriter(FileSystemWriter):
    """Testing aid (debug.fail_save=io_error): writes nothing and fails like a full disk."""

    def write_data(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device (injected by debug.fail_save)", str(self.path))
