# The single-device model: shapes, presets, and exact parity with diffusers' CogVideoXTransformer3DModel
# (sincos and RoPE variants) through the converter and the safetensors loader. No downloads.
import pytest
import torch

from cpdit import CogVideoXConfig, CogVideoXDiT
from cpdit.models.cogvideox.convert import config_from_diffusers, state_dict_from_diffusers, state_dict_to_diffusers

diffusers = pytest.importorskip("diffusers")


def _diffusers_model(rope: bool, seed: int = 0, **arch):
    """A tiny diffusers CogVideoX transformer (`arch`: config overrides), every weight random."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=24,
        num_layers=2,
        sample_width=10,
        sample_height=6,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=7,
        **{"in_channels": 4, "use_rotary_positional_embeddings": rope, **arch},
    )
    with torch.no_grad():  # every weight random (diffusers zero-initialises some), so parity means something
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        if model.config.use_learned_positional_embeddings:  # a buffer in diffusers, a trained table
            model.patch_embed.pos_embedding.copy_(torch.randn_like(model.patch_embed.pos_embedding) * 0.2)
    return model.eval()


def _pipeline_rope(model, height, width, frames):
    """The rotary embedding exactly as diffusers' CogVideoXPipeline computes it (latent height/width)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    try:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    except ImportError:  # the pipeline module needs transformers
        pytest.skip("transformers is not installed")
    c = model.config
    gh, gw = height // c.patch_size, width // c.patch_size
    crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // c.patch_size, c.sample_height // c.patch_size)
    return get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), frames)


@pytest.mark.parametrize("rope", [False, True], ids=["sincos-2b", "rope-5b"])
@pytest.mark.parametrize("size", [(6, 10), (8, 8)], ids=["sample-size", "other-size"])
def test_diffusers_parity(tmp_path, rope, size):
    ref = _diffusers_model(rope)
    ref.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors
    ours = CogVideoXDiT.from_diffusers(tmp_path).eval()
    assert ours.config.pos_embedding == ("rope" if rope else "sincos")
    H, W = size
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, 4, H, W, generator=gen)
    text = torch.randn(2, 7, 24, generator=gen)
    t = torch.tensor([3, 901])
    kwargs = dict(image_rotary_emb=_pipeline_rope(ref, H, W, 3)) if rope else {}
    with torch.no_grad():
        want = ref(latents, text, t, return_dict=False, **kwargs)[0]
        got = ours(latents, text, t)
    assert got.shape == want.shape == (2, 3, 4, H, W)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_config():
    ref = _diffusers_model(False)
    sd = {k: v for k, v in ref.state_dict().items()}
    ours = state_dict_from_diffusers(sd)
    back = state_dict_to_diffusers(ours)
    assert set(back) == {k for k in sd if not k.startswith("patch_embed.pos_embedding")}
    cfg = config_from_diffusers(dict(ref.config))
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers, cfg.pos_embedding) == (4, 16, 2, "sincos")
    with pytest.raises(ValueError, match="patch_size_t=2 comes with pos_embedding='rope'"):
        config_from_diffusers({**dict(ref.config), "patch_size_t": 2})  # no sin-cos 1.5 checkpoint exists
    with pytest.raises(ValueError, match="patch_bias=False with a per-frame Conv2d"):
        config_from_diffusers({**dict(ref.config), "patch_bias": False})
    with pytest.raises(KeyError, match="unexpected key 'bogus.weight'"):
        state_dict_from_diffusers({"bogus.weight": torch.zeros(1)})


def test_presets_and_errors(tmp_path):
    tiny = CogVideoXConfig.preset("tiny")
    assert CogVideoXConfig.preset("cogvideox-2b").hidden_size == 1920
    five = CogVideoXConfig.preset("cogvideox-5b")
    assert (five.hidden_size, five.num_layers, five.pos_embedding) == (3072, 42, "rope")
    assert CogVideoXConfig.preset("tiny", num_layers=3, attention_head_dim=None).num_layers == 3
    with pytest.raises(ValueError, match="model preset 'huge' is unknown"):
        CogVideoXConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown CogVideoXConfig field"):
        CogVideoXConfig.preset("tiny", n_layers=3)
    model = CogVideoXDiT(tiny)
    model.init_weights(0)
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        model(torch.randn(1, 2, 4, 7, 8), torch.randn(1, 3, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(1, 2, 3, 8, 8), torch.randn(1, 3, 32), torch.tensor([1]))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CogVideoXDiT.from_diffusers(tmp_path)


@pytest.mark.parametrize("preset", ["tiny", "svd-like", "phenaki-like"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_matches(preset, mode):
    """AC applied from outside (parallel/parallelize.py) recomputes the chosen blocks in the backward (each of
    them runs forward twice) and changes no gradient and no parameter name."""
    import copy

    from cpdit.models.registry import family_of_preset
    from parallel.parallelize import apply_activation_checkpointing

    family = family_of_preset(preset)
    torch.manual_seed(0)
    model = family.build(family.presets[preset])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    C = model.config.in_channels
    x, txt, t = torch.randn(1, 3, C, 8, 8), torch.randn(1, 5, model.config.text_embed_dim), torch.tensor([7])
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, mode)
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in model.named_parameters()]
    grads, calls = [], []
    for m in (model, checkpointed):
        count = [0] * len(m.blocks)
        for i, block in enumerate(m.blocks):
            block.register_forward_pre_hook(lambda *_, i=i, count=count: count.__setitem__(i, count[i] + 1))
        m(x, txt, t).square().mean().backward()
        grads.append([p.grad for p in m.parameters()])
        calls.append(count)
    every = {"full": 1, "selective": 2}[mode]
    assert calls[0] == [1] * len(model.blocks)
    assert calls[1] == [2 if i % every == 0 else 1 for i in range(len(model.blocks))]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
