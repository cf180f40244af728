# Text encoders: the hashed default, and T5 from a local directory (a tiny random T5 and a word-level tokenizer
# written here, so nothing is downloaded), with its on-disk embedding cache.
import pytest
import torch
from safetensors.torch import load_file, save_file
from t5_helpers import make_tiny_t5

from cpdit.text import HashedTextEncoder, T5TextEncoder, hash_tokens


def test_hashed_encoder():
    enc = HashedTextEncoder(dim=8, max_length=6)
    enc.init_weights(0)
    a, b = enc(["a red circle moving left", "a red circle moving right"])
    assert a.shape == (6, 8)
    assert torch.equal(a[:4], b[:4]) and not torch.equal(a[4], b[4])
    assert torch.all(a[5] == 0)  # padding
    assert hash_tokens("A  Red, circle!", 4096, 4)[:3] == hash_tokens("a red circle", 4096, 4)[:3]


@pytest.fixture
def t5_dir(tmp_path):
    pytest.importorskip("transformers")
    make_tiny_t5(tmp_path / "t5")
    return tmp_path / "t5"


def test_t5_local_with_cache(t5_dir, tmp_path):
    cache = tmp_path / "cache"
    enc = T5TextEncoder(str(t5_dir), max_length=12, cache_dir=str(cache))
    assert enc.dim == 16 and not any(p.requires_grad for p in enc.parameters())
    out = enc(["a red circle moving left", "a blue square"])
    assert out.shape == (2, 12, 16)
    assert len(list(cache.glob("*.safetensors"))) == 2
    again = T5TextEncoder(str(t5_dir), max_length=12, cache_dir=str(cache))(["a blue square"])
    torch.testing.assert_close(again[0], out[1])
    # the cache is read, not recomputed: a planted entry comes back as it was written
    enc = T5TextEncoder(str(t5_dir), max_length=12, cache_dir=str(cache))
    save_file({"embedding": torch.full((12, 16), 7.0)}, str(cache / f"{enc._key('a blue square')}.safetensors"))
    assert torch.equal(enc(["a blue square"])[0], torch.full((12, 16), 7.0))


def test_t5_missing_directory(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        T5TextEncoder(str(tmp_path / "nope"))


def test_t5_corrupt_weights(t5_dir):
    weights = next(t5_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(RuntimeError, match="could not load a T5 encoder"):
        T5TextEncoder(str(t5_dir))


def test_a_symlink_in_the_t5_directory_is_refused_before_loading(t5_dir, tmp_path):
    """transformers reads the directory's files itself: one that is a symlink (to anything) is refused up front, by
    the encoder and by the launcher's pre-flight, with the fix for a Hugging Face cache snapshot."""
    from launch.config import ConfigError, load_config
    from launch.preflight import preflight

    weights = next(t5_dir.glob("*.safetensors"))
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    with pytest.raises(ValueError, match=r"is a symlink .*cp -rL"):
        T5TextEncoder(str(t5_dir))
    cfg = load_config(overrides=["text.encoder=t5", f"text.path={t5_dir}", "model.text_embed_dim=16"])
    with pytest.raises(ConfigError, match=r"text.path=.* is a symlink"):
        preflight(cfg, 4, "train")


def test_a_symlink_in_the_embedding_cache_is_never_read_or_written_through(t5_dir, tmp_path):
    cache = tmp_path / "cache"
    enc = T5TextEncoder(str(t5_dir), max_length=12, cache_dir=str(cache))
    cache.mkdir()
    target = tmp_path / "someone_elses.safetensors"
    save_file({"embedding": torch.full((12, 16), 7.0)}, str(target))
    entry = cache / f"{enc._key('a blue square')}.safetensors"
    entry.symlink_to(target)
    out = enc(["a blue square"])
    assert not torch.equal(out[0], torch.full((12, 16), 7.0))  # computed, not read through the link
    assert not entry.is_symlink() and entry.is_file()  # the entry is now a plain file
    assert torch.equal(load_file(str(target))["embedding"], torch.full((12, 16), 7.0))  # the target is untouched


def test_a_damaged_embedding_cache_entry_is_encoded_again(t5_dir, tmp_path):
    """A T5 cache entry that is not a safetensors file of an embedding (garbage, a pickle, another key) is a miss:
    computed and written over, never unpickled."""
    cache = tmp_path / "cache"
    enc = T5TextEncoder(str(t5_dir), max_length=12, cache_dir=str(cache))
    want = enc(["a red circle"])
    entry = cache / f"{enc._key('a red circle')}.safetensors"
    for garbage in (b"\x80\x04K\x01.", b"\x08\0\0\0\0\0\0\0{bad: 1}"):
        entry.write_bytes(garbage)
        assert torch.equal(enc(["a red circle"]), want)
        assert torch.equal(load_file(str(entry))["embedding"], want[0])
    save_file({"other": torch.zeros(1)}, str(entry))
    assert torch.equal(enc(["a red circle"]), want)
