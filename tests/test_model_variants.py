# The CogVideoX checkpoints besides the text-to-video 1.0 ones, exact against diffusers' CogVideoXTransformer3DModel
# in float64 (output and every gradient): 5B-I2V (RoPE + a learned position table, [noisy | image] latents in),
# 1.5 (temporal patches of 2 frames, RoPE on the sliced grid) and 1.5-I2V (+ the ofs embedding). Each is loaded from
# a save_pretrained directory, exported back to one that diffusers loads, and its LoRA adapters load into diffusers.
import pytest
import torch
from test_model import _diffusers_model

from cpdit import CogVideoXConfig, CogVideoXDiT
from cpdit.lora import add_lora
from cpdit.models.cogvideox.convert import config_from_diffusers, state_dict_to_diffusers
from launch.job.export import export_model

diffusers = pytest.importorskip("diffusers")

F64 = dict(rtol=1e-10, atol=1e-12)

# diffusers config overrides of each variant (test_model's tiny model otherwise)
VARIANTS = {
    "5b-i2v": dict(in_channels=8, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    "1.5-i2v": dict(
        in_channels=8, use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, ofs_embed_dim=32
    ),
}
TEXT_LEN = 7  # test_model's max_text_seq_length


def diffusers_variant(variant: str, seed: int = 0):
    """test_model's tiny diffusers model (4 heads x 16, 2 blocks, sample shape 9 frames = 3 latents of 6 x 10, 7 text
    tokens) as this variant, every weight random, the learned table too."""
    return _diffusers_model(rope=True, seed=seed, **VARIANTS[variant])


def pipeline_rope(model, lh: int, lw: int, frames: int):
    """The rotary embedding exactly as diffusers' CogVideoX (1.0) and CogVideoX 1.5 pipelines compute it from the
    latent height, width and frame count."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    c = model.config
    gh, gw = lh // c.patch_size, lw // c.patch_size
    base_h, base_w = c.sample_height // c.patch_size, c.sample_width // c.patch_size
    if c.patch_size_t is None:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), frames)
    p_t = c.patch_size_t
    return get_3d_rotary_pos_embed(
        c.attention_head_dim,
        None,
        (gh, gw),
        (frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
    )


def diffusers_forward(ref, latents, text, t):
    c = ref.config
    kwargs = dict(image_rotary_emb=pipeline_rope(ref, latents.shape[3], latents.shape[4], latents.shape[1]))
    if c.ofs_embed_dim:
        kwargs["ofs"] = latents.new_full((1,), 2.0)  # what diffusers' 1.5 I2V pipeline passes
    return ref(latents, text, t, return_dict=False, **kwargs)[0]


def variant_inputs(variant: str, size=(6, 10), frames: int = 3, seed: int = 1, dtype=torch.float64):
    """The 5B-I2V table fixes the shape (3 latent frames of 6 x 10, 7 text tokens); 1.5 patches pairs of frames."""
    if variant.startswith("1.5"):
        frames = 2 * frames
    c_in = VARIANTS[variant].get("in_channels", 4)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, frames, c_in, *size, generator=gen, dtype=dtype)
    text = torch.randn(2, TEXT_LEN, 24, generator=gen, dtype=dtype)
    return latents, text, torch.tensor([3.0, 901.0], dtype=dtype)


SIZES = {"5b-i2v": [(6, 10)], "1.5": [(6, 10), (4, 6)], "1.5-i2v": [(6, 10), (4, 6)]}
CASES = [(v, s) for v, sizes in SIZES.items() for s in sizes]


@pytest.fixture
def rope_in_input_dtype(monkeypatch):
    """diffusers applies RoPE in float32 whatever the input's dtype (`apply_rotary_emb`: `x.float() * cos + ...`),
    which caps a float64 comparison at ~1e-6. For the float64 proof its attention processor gets the same formula
    (interleaved pairs, real form) evaluated in the input's dtype; the float32 comparisons use diffusers untouched."""
    import diffusers.models.embeddings as emb

    def apply(x, freqs, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        assert use_real and use_real_unbind_dim == -1 and sequence_dim == 2  # CogVideoX's call
        cos, sin = (f[None, None].to(x) for f in freqs)
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * cos + torch.stack([-x_imag, x_real], dim=-1).flatten(3) * sin

    monkeypatch.setattr(emb, "apply_rotary_emb", apply)


@pytest.mark.parametrize("variant,size", CASES, ids=[f"{v}-{h}x{w}" for v, (h, w) in CASES])
def test_variant_parity_float64(tmp_path, variant, size, rope_in_input_dtype):
    """Loaded from a save_pretrained directory: output and every gradient equal diffusers' in float64 (the learned
    table too: diffusers keeps it as a buffer, made a leaf here to compare its gradient)."""
    ref = diffusers_variant(variant).double()
    ref.save_pretrained(tmp_path)
    ours = CogVideoXDiT.from_diffusers(tmp_path, dtype=torch.float64).eval()
    c = ours.config
    assert c.image_conditioned == ("i2v" in variant) and c.pos_embedding == "rope"
    assert (c.patch_size_t, c.ofs_embed_dim) == (
        VARIANTS[variant].get("patch_size_t"),
        VARIANTS[variant].get("ofs_embed_dim"),
    )
    latents, text, t = variant_inputs(variant, size)
    if c.use_learned_positional_embeddings:
        ref.patch_embed.pos_embedding.requires_grad_(True)
    weights = torch.randn(
        2, latents.shape[1], 4, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    want = diffusers_forward(ref, latents, text, t)
    got = ours(latents, text, t)
    assert got.shape == want.shape == (2, latents.shape[1], 4, *size)
    torch.testing.assert_close(got, want, **F64)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    if c.use_learned_positional_embeddings:
        ref_grads["patch_embed.pos_embedding"] = ref.patch_embed.pos_embedding.grad
    ours_grads = state_dict_to_diffusers({n: p.grad for n, p in ours.named_parameters()})
    assert set(ours_grads) == set(ref_grads)
    for name, g in ours_grads.items():
        torch.testing.assert_close(g, ref_grads[name], **F64, msg=lambda m, name=name: f"{variant} grad {name}: {m}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_export_loads_in_diffusers(tmp_path, variant):
    """cpdit's export (launch/job/export.py) of each variant is a directory diffusers loads, with the same outputs;
    the LoRA export is in diffusers' key layout: diffusers loads it onto its model and gives the adapted outputs."""
    from diffusers import CogVideoXTransformer3DModel

    ref = diffusers_variant(variant)
    ref.save_pretrained(tmp_path / "in")
    ours = CogVideoXDiT.from_diffusers(tmp_path / "in").eval()
    add_lora(ours, 4, alpha=4.0)  # alpha = rank: the scale 1 peft assumes without network alphas
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora." in n:
                p.copy_(torch.randn_like(p) * 0.1)
    export_model(ours, None, tmp_path / "out", rank=0, lora=True)
    back = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "out" / "diffusers").eval()
    assert config_from_diffusers(dict(back.config)) == ours.config
    latents, text, t = variant_inputs(variant, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(diffusers_forward(back, latents, text, t), diffusers_forward(ref, latents, text, t))
        adapted = ours(latents, text, t)
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    adapters = load_file(str(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors"))
    back.load_lora_adapter(adapters, prefix="transformer", adapter_name="cpdit")
    with torch.no_grad():
        torch.testing.assert_close(diffusers_forward(back, latents, text, t), adapted, rtol=1e-5, atol=1e-5)


def test_variant_refusals():
    """A shape the learned table does not fit, a frame count temporal patches do not divide, ofs on a model without
    it: each a ValueError naming the sizes."""
    i2v = CogVideoXDiT(config_from_diffusers(dict(diffusers_variant("5b-i2v").config)))
    latents, text, t = variant_inputs("5b-i2v", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"fits 3 latent frames of 6 x 10 latents and 7 text tokens, got 2 frames"):
        i2v(latents[:, :2], text, t)
    with pytest.raises(ValueError, match=r"got 3 frames of 4 x 10 and 7 text tokens"):
        i2v(latents[..., :4, :], text, t)
    with pytest.raises(ValueError, match=r"and 5 text tokens"):
        i2v(latents, text[:, :5], t)
    with pytest.raises(ValueError, match="ofs is an input of models with ofs_embed_dim"):
        i2v(latents, text, t, ofs=2.0)
    v15 = CogVideoXDiT(config_from_diffusers(dict(diffusers_variant("1.5").config)))
    latents, text, t = variant_inputs("1.5", dtype=torch.float32)
    with pytest.raises(ValueError, match="5 latent frames do not group into patch_size_t=2: use a multiple of 2"):
        v15(latents[:, :5], text, t)
    with pytest.raises(ValueError, match="comes with pos_embedding='rope'"):
        CogVideoXConfig.preset("tiny", patch_size_t=2)
    with pytest.raises(ValueError, match="ofs_embed_dim=32 must equal time_embed_dim=64"):
        CogVideoXConfig.preset("tiny", pos_embedding="rope", ofs_embed_dim=32)


def test_real_presets():
    """The presets have the released checkpoints' shapes (their diffusers config.json values)."""
    i2v = CogVideoXConfig.preset("cogvideox-5b-i2v")
    assert (i2v.hidden_size, i2v.num_layers, i2v.in_channels, i2v.out_channels) == (3072, 42, 32, 16)
    assert i2v.use_learned_positional_embeddings and i2v.learned_positions() == 226 + 13 * 30 * 45
    v15 = CogVideoXConfig.preset("cogvideox1.5-5b")
    assert (v15.patch_size_t, v15.sample_height, v15.sample_width, v15.sample_frames) == (2, 300, 300, 81)
    assert not v15.image_conditioned and v15.ofs_embed_dim is None
    v15i = CogVideoXConfig.preset("cogvideox1.5-5b-i2v")
    assert (v15i.in_channels, v15i.ofs_embed_dim, v15i.patch_size_t) == (32, 512, 2) and v15i.image_conditioned
    with torch.device("meta"):
        sizes = {
            n: sum(p.numel() for p in CogVideoXDiT(CogVideoXConfig.preset(n)).parameters())
            for n in ("cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v")
        }
    # 5B-I2V: + the table (17776 x 3072) + 16 x 4 x 3072 patch weights; 1.5: a Linear over 2x2x2 patches
    assert sizes["cogvideox-5b-i2v"] - sizes["cogvideox-5b"] == 17776 * 3072 + 16 * 4 * 3072
