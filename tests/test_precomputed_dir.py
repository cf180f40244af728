# A precomputed directory that cannot be trained from, and a precompute that cannot run, are refused by
# `cpdit-launch` with exit 2 before any process starts, naming the file or knob and the fix; nothing in the
# directory is changed and nothing is unpickled. The directories are written with the format's own writer
# (launch/job/precomputed.py) from the job's plan (launch/job/precompute.py: planned_index), random tensors inside.
import json
import pickle
import shutil

import pytest
import torch

from launch.cli import main
from launch.config import load_config
from launch.job.build import posterior_stage
from launch.job.precompute import planned_index
from launch.job.precomputed import PrecomputedDataset, write_index, write_shard

VAE = ["first_stage.kind=vae", "first_stage.preset=tiny", "data.num_frames=9", "data.num_samples=8"]
ONE = ["--nproc-per-node", "1", "--cp-size", "1", "--model-parallel-size", "1"]


def make_dir(root, overrides=(), complete=True):
    """A precomputed directory of the tiny VAE's synthetic clips, as the precompute job lays it out."""
    cfg = load_config(overrides=[*VAE, "precompute.shard_size=3", *overrides])
    index = planned_index(cfg, 8, posterior_stage(cfg), image=False, width=None, text_dtype="")
    root.mkdir(parents=True)
    write_index(root, index)
    gen = torch.Generator().manual_seed(0)
    for k in range(index.num_shards):
        n = len(index.shard_clips(k))
        tensors = {key: torch.randn((n, *shape), generator=gen) for key, shape in index.keys.items()}
        write_shard(root, index, k, tensors, [f"caption {i}" for i in index.shard_clips(k)])
    index.complete = complete
    write_index(root, index)
    return index


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre") / "good"
    make_dir(root)
    return root


def refused(capsys, command, *args):
    code = main([*ONE, command, *VAE, *args], environ={})
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("cpdit-launch: error: ") and "Traceback" not in err
    return err


def train_from(root, *extra):
    return ["data.dataset=precomputed", f"data.path={root}", "train.output_dir=/nonexistent-parent-ok", *extra]


def broken(tmp_path, good, name):
    root = tmp_path / name
    shutil.copytree(good, root)
    return root


def test_a_good_directory_reads_back_clip_by_clip(good):
    data = PrecomputedDataset(good)
    entry, caption = data[7]  # shard 2, its second clip
    assert len(data) == 8 and caption == "caption 7" and entry["mean"].shape == (4, 3, 4, 4)


def test_no_index(tmp_path, capsys, nothing_starts):
    (tmp_path / "videos").mkdir()
    err = refused(capsys, "train", *train_from(tmp_path))
    assert "has no index.json" in err and "cpdit-launch precompute" in err


def test_not_an_index(tmp_path, capsys, nothing_starts):
    (tmp_path / "index.json").write_text("{not json")
    assert "is not a valid precompute index" in refused(capsys, "train", *train_from(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    assert "is not a cpdit precompute index" in refused(capsys, "train", *train_from(tmp_path))


def test_an_unfinished_precompute(tmp_path, good, capsys, nothing_starts):
    root = broken(tmp_path, good, "unfinished")
    (root / "shard-000001.safetensors").unlink()
    err = refused(capsys, "train", *train_from(root))
    assert "shard-000001.safetensors is missing: the precompute did not finish" in err
    assert "rerun `cpdit-launch precompute`" in err


def test_a_shard_of_another_precompute(tmp_path, good, capsys, nothing_starts):
    other = tmp_path / "other"
    make_dir(other, ["train.seed=1"])  # another random VAE: another fingerprint
    root = broken(tmp_path, good, "mixed")
    shutil.copy(other / "shard-000001.safetensors", root / "shard-000001.safetensors")
    err = refused(capsys, "train", *train_from(root))
    assert "shard-000001.safetensors was not written by the precompute that" in err and "remove it" in err


def test_a_pickle_under_a_shard_name_is_never_unpickled(tmp_path, good, capsys, nothing_starts, monkeypatch):
    root = broken(tmp_path, good, "pickled")
    (root / "shard-000000.safetensors").write_bytes(pickle.dumps({"mean": torch.zeros(3)}))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    assert "shard-000000.safetensors is not a readable safetensors shard" in refused(capsys, "train", *train_from(root))


def test_a_symlinked_shard(tmp_path, good, capsys, nothing_starts):
    root = broken(tmp_path, good, "linked")
    (root / "shard-000002.safetensors").unlink()
    (root / "shard-000002.safetensors").symlink_to(good / "shard-000002.safetensors")
    assert "is a symlink" in refused(capsys, "train", *train_from(root))


def test_a_shard_of_other_shapes(tmp_path, good, capsys, nothing_starts):
    root = broken(tmp_path, good, "reshaped")
    from launch.job.precomputed import read_index

    index = read_index(root)
    write_shard(root, index, 0, {"mean": torch.zeros(3, 4, 3, 8, 8), "logvar": torch.zeros(3, 4, 3, 8, 8)}, ["a"] * 3)
    assert "shard-000000.safetensors holds" in refused(capsys, "train", *train_from(root))


def test_clips_of_another_shape(good, capsys, nothing_starts):
    err = refused(capsys, "train", *train_from(good, "data.num_frames=17"))
    assert "data.num_frames=17 but data.path=" in err and "holds clips of num_frames 9" in err


def test_an_image_to_video_model_on_text_to_video_entries(good, capsys, nothing_starts):
    i2v = ["model.preset=tiny", "model.in_channels=8", "model.out_channels=4", "model.pos_embedding=rope"]
    err = refused(capsys, "train", *train_from(good, *i2v, "train.image_noise=clip", "sample.at_end=false"))
    assert "precomputed for a text-to-video model" in err


def test_another_first_stage(good, capsys, nothing_starts):
    assert "was encoded by another first stage" in refused(capsys, "train", *train_from(good, "train.seed=3"))


def test_precompute_knobs(tmp_path, good, capsys, nothing_starts):
    assert "needs precompute.output_dir" in refused(capsys, "precompute")
    err = refused(capsys, "precompute", f"precompute.output_dir={tmp_path}/p", "first_stage.kind=pixel")
    assert "set first_stage.kind=vae" in err
    err = refused(capsys, "precompute", f"precompute.output_dir={tmp_path}/p", *train_from(good))
    assert "data.dataset=precomputed is its output" in err
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    err = refused(capsys, "precompute", f"precompute.output_dir={good}", "precompute.shard_size=3", "train.seed=5")
    assert f"precompute.output_dir={str(good)!r} holds the precompute of another config" in err
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # nothing changed
