# Loading a checkpoint never runs code and never reads outside the checkpoint directory. Each case crafts a
# checkpoint whose payload would create a marker file; a control shows the payload does run where DCP's defaults
# or plain pickle would load it, and cpdit's loader (launch/job/ckpt_files.py) refuses it with the file named and the
# marker never appears. Single process (DCP without a process group); the job-level refusal is in test_train.py.
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from launch.job.ckpt_files import CheckpointRefused, SafeLoadPlanner, SafeReader, read_metadata


class Touch:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        yield


def save(directory: Path, state: dict) -> Path:
    dcp.save(state, checkpoint_id=str(directory))
    return directory


def safe_load(directory: Path, state: dict) -> None:
    read_metadata(directory)
    dcp.load(state, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner())


def refused(fn) -> str:
    with pytest.raises((CheckpointRefused, CheckpointException)) as info:
        fn()
    return str(info.value)


def test_a_plain_checkpoint_loads(tmp_path):
    ckpt = save(tmp_path / "ok", {"t": torch.arange(6.0), "group": {"lr": 0.1, "betas": (0.9, 0.95), "name": "a"}})
    state = {"t": torch.zeros(6), "group": {"lr": 0.0, "betas": (0.0, 0.0), "name": ""}}
    safe_load(ckpt, state)
    assert torch.equal(state["t"], torch.arange(6.0)) and state["group"]["lr"] == 0.1


def test_a_byte_entry_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    ckpt = save(tmp_path / "bytes", {"t": torch.ones(2), "lr": Touch(marker)})
    dcp.load({"t": torch.zeros(2), "lr": 0.0}, checkpoint_id=str(ckpt), planner=DefaultLoadPlanner())  # control
    assert marker.exists(), "control: DCP's default planner runs the payload"
    marker.unlink()
    msg = refused(lambda: safe_load(ckpt, {"t": torch.zeros(2), "lr": 0.0}))
    assert "'lr' is not plain data" in msg and not marker.exists()


def test_a_tensor_declared_as_bytes_is_refused_before_decoding(tmp_path):
    marker = tmp_path / "ran"
    ckpt = save(tmp_path / "tensor-as-bytes", {"weight": Touch(marker)})
    msg = refused(lambda: safe_load(ckpt, {"weight": torch.zeros(3)}))
    assert "'weight' is a tensor here but stored as bytes" in msg and not marker.exists()


def _nested_pickle_via_dotted_name(payload: bytes) -> bytes:
    """Protocol 4: GLOBAL torch.distributed.checkpoint.filesystem `pickle.loads` (a dotted attribute path under a
    module DCP's metadata legitimately uses), called on `payload`."""
    out = b"\x80\x04"
    for s in (b"torch.distributed.checkpoint.filesystem", b"pickle.loads"):
        out += b"\x8c" + bytes([len(s)]) + s  # SHORT_BINUNICODE
    out += b"\x93"  # STACK_GLOBAL
    out += b"B" + struct.pack("<I", len(payload)) + payload  # BINBYTES
    return out + b"\x85R."  # TUPLE1, REDUCE, STOP


def test_metadata_allow_list_admits_no_dotted_names(tmp_path):
    marker = tmp_path / "ran"
    crafted = _nested_pickle_via_dotted_name(pickle.dumps(Touch(marker)))
    pickle.loads(crafted)  # control: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    ckpt = save(tmp_path / "meta", {"t": torch.ones(2)})
    (ckpt / ".metadata").write_bytes(crafted)
    msg = refused(lambda: read_metadata(ckpt))
    assert str(ckpt / ".metadata") in msg and "pickle.loads" in msg and not marker.exists()
    msg = refused(lambda: safe_load(ckpt, {"t": torch.zeros(2)}))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["../outside/{name}", "/{root}/outside/{name}"], ids=["relative", "absolute"])
def test_storage_paths_must_stay_inside_the_checkpoint(tmp_path, where):
    ckpt = save(tmp_path / "ckpt", {"t": torch.arange(4.0)})
    outside = tmp_path / "outside"
    outside.mkdir()
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file, in a test
    for info in metadata.storage_data.values():
        shutil.copy(ckpt / info.relative_path, outside / info.relative_path)
        info.relative_path = where.format(name=info.relative_path, root=str(tmp_path).lstrip("/"))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    state = {"t": torch.zeros(4)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))  # control: DCP reads the outside file
    assert torch.equal(state["t"], torch.arange(4.0))
    msg = refused(lambda: safe_load(ckpt, {"t": torch.zeros(4)}))
    assert "not a file name inside" in msg and str(ckpt / ".metadata") in msg


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "diffusion_pytorch_model.bin"])
def test_pretrained_shards_are_safetensors_files_inside_the_directory(tmp_path, shard):
    import json

    from safetensors.torch import save_file

    from cpdit.diffusers_io import load_diffusers_state_dict

    d = tmp_path / "pretrained"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"w": torch.ones(1)}, str(tmp_path / "elsewhere.safetensors"))
    (d / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Touch(tmp_path / "ran")))
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ValueError, match=r"are not \*\.safetensors files inside"):
        load_diffusers_state_dict(d)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("which", ["shard", ".metadata"])
def test_a_symlinked_checkpoint_file_is_refused(tmp_path, which):
    """A name that passes as a file inside the checkpoint but is a symlink to a file elsewhere: DCP follows it
    (the control), cpdit refuses it, in the load and in the manifest check before it."""
    from launch.job.ckpt_files import merge_manifest, verify_files, write_manifest_part

    ckpt = save(tmp_path / "ckpt", {"t": torch.arange(4.0)})
    write_manifest_part(ckpt, 0)
    merge_manifest(ckpt, 1)
    assert verify_files(ckpt, 0, 1) == []
    name = ".metadata" if which == ".metadata" else next(p.name for p in ckpt.glob("*.distcp"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(ckpt / name, outside / name)
    (ckpt / name).symlink_to(outside / name)
    state = {"t": torch.zeros(4)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))  # control: DCP reads through the link
    assert torch.equal(state["t"], torch.arange(4.0))
    msg = refused(lambda: safe_load(ckpt, {"t": torch.zeros(4)}))
    assert "is a symlink" in msg and str(ckpt / name) in msg
    assert any("is a symlink" in p for p in verify_files(ckpt, 0, 1))


@pytest.mark.parametrize("which", ["weights", "config.json"])
def test_a_symlinked_pretrained_file_is_refused(tmp_path, which):
    from safetensors.torch import save_file

    from cpdit.diffusers_io import load_diffusers_state_dict
    from cpdit.safe_paths import OutsideDirectory

    d, elsewhere = tmp_path / "pretrained", tmp_path / "elsewhere"
    d.mkdir()
    elsewhere.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"w": torch.ones(1)}, str(d / "diffusion_pytorch_model.safetensors"))
    assert load_diffusers_state_dict(d)[1]["w"].item() == 1.0  # control: the plain directory loads
    name = "config.json" if which == "config.json" else "diffusion_pytorch_model.safetensors"
    shutil.move(d / name, elsewhere / name)
    (d / name).symlink_to(elsewhere / name)
    with pytest.raises(OutsideDirectory, match="is a symlink"):
        load_diffusers_state_dict(d)


def test_a_symlinked_latent_cache_entry_is_a_miss_and_is_replaced(tmp_path):
    """A latent cache entry (data.latent_cache_dir) that is a symlink is never read: a miss, encoded again, and the
    new entry is renamed over the link (the target is never written through)."""
    import torch
    from safetensors.torch import load_file, save_file

    from launch.job.latent_cache import LatentCache

    cache = LatentCache(tmp_path / "latents", "k", writer=True, group=None)
    target = tmp_path / "elsewhere.safetensors"
    save_file({"mean": torch.ones(2, 1, 1, 1), "logvar": torch.zeros(2, 1, 1, 1)}, str(target))
    cache.path(0).symlink_to(target)
    assert cache._load([0], torch.device("cpu")) is None
    plain = cache.path(1)
    save_file({"mean": torch.ones(2, 1, 1, 1), "logvar": torch.zeros(2, 1, 1, 1)}, str(plain))
    assert cache._load([1], torch.device("cpu")) is not None  # a plain entry is read

    encoded = {"mean": torch.full((1, 2, 1, 1, 1), 5.0), "logvar": torch.zeros(1, 2, 1, 1, 1)}
    assert cache.entries([0], torch.device("cpu"), lambda: encoded) is encoded  # a miss: computed
    assert not cache.path(0).is_symlink() and torch.equal(
        load_file(str(cache.path(0)))["mean"], torch.full((2, 1, 1, 1), 5.0)
    )
    assert torch.equal(load_file(str(target))["mean"], torch.ones(2, 1, 1, 1))


@pytest.mark.parametrize("garbage", [b"\x08\0\0\0\0\0\0\0{bad: 1}", b"\x80\x04K\x01."], ids=["bad header", "a pickle"])
def test_a_damaged_latent_cache_entry_is_a_miss(tmp_path, garbage):
    """A cache entry that is not a safetensors file (a bad header, a pickle: safetensors raises its own
    SafetensorError, not an OSError) is a miss, encoded again and written over; it is never unpickled."""
    import torch

    from launch.job.latent_cache import LatentCache

    cache = LatentCache(tmp_path / "latents", "k", writer=True, group=None)
    cache.path(0).write_bytes(garbage)
    assert cache._load([0], torch.device("cpu")) is None
    encoded = {"mean": torch.ones(1, 2, 1, 1, 1), "logvar": torch.zeros(1, 2, 1, 1, 1)}
    assert cache.entries([0], torch.device("cpu"), lambda: encoded) is encoded
    assert cache._load([0], torch.device("cpu")) is not None
