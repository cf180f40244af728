# The model-family registry (cpdit/models/registry.py): what every family declares is consistent with its model,
# so launch/ and parallel/ can rely on it without knowing the families.
from dataclasses import fields, replace

import pytest
import torch

from cpdit.lora import add_lora
from cpdit.models.family import TP_STYLES, field_docs
from cpdit.models.registry import FAMILIES, all_presets, family_of, family_of_diffusers, family_of_preset
from launch.config import ConfigError, ModelConfig, load_config
from parallel.tensor_parallel import check_tensor_parallel, plan_matches


def _meta_model(family, preset):
    with torch.device("meta"):
        model = family.build(family.presets[preset])
        if family.lora:
            add_lora(model, 2)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_spec_matches_its_model(name):
    family = FAMILIES[name]
    assert family.name == name and family.presets
    for preset, config in family.presets.items():
        assert type(config) is family.config_class
        assert family_of(config) is family and family_of_preset(preset) is family
        model = _meta_model(family, preset)
        assert family_of(model) is family and isinstance(model, family.model_class)
        assert isinstance(family.frame_causal(config), bool)
        # every style is known, and every pattern of the plan names a module of the model (LoRA attached)
        assert set(family.tp_plan.values()) <= set(TP_STYLES)
        matched = plan_matches(model, dict(family.tp_plan))
        for pattern in family.tp_plan:
            assert any(_matches(pattern, n) for n, _, _ in matched), f"{name}/{preset}: {pattern} matches no module"
        linear = {n for n, m, s in matched if s in ("colwise", "rowwise")}
        assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in linear)
    # the family's own job knobs exist in the job's model section and in its config
    job = {f.name for f in fields(ModelConfig)}
    own = {f.name for f in fields(family.config_class)}
    assert set(family.job_knobs) <= job and set(family.job_knobs) <= own


def _matches(pattern, name):
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(a in ("*", b) for a, b in zip(p, n, strict=True))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_config_field_has_a_docstring(name):
    cls = FAMILIES[name].config_class
    missing = [f.name for f in fields(cls) if f.name not in field_docs(cls)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_a_family_declares_its_job_knobs():
    """The job's `model:` section takes each family's knobs from the family, typed and documented by its config; a
    knob that is no documented field of the config is refused."""
    job = {f.name: f for f in fields(ModelConfig)}
    svd = FAMILIES["factorized"]
    assert job["merge_factor"].type == float | None and job["temporal_blocks"].type == int | None
    assert job["merge_factor"].metadata["doc"].startswith("factorized: ")
    assert load_config(overrides=["model.temporal_blocks=3"]).model.temporal_blocks == 3
    with pytest.raises(ConfigError, match="model.temporal_blocks"):
        load_config(overrides=["model.temporal_blocks=many"])
    with pytest.raises(TypeError, match="job knob 'blend' is not a documented field of FactorizedDiTConfig"):
        replace(svd, job_knobs=(*svd.job_knobs, "blend")).knobs()


def test_lookups_refuse_what_they_do_not_know():
    assert len(all_presets()) == len(set(all_presets()))  # a preset name belongs to one family
    with pytest.raises(ValueError, match="model preset 'nope' is unknown; choose one of tiny, demo"):
        family_of_preset("nope")
    with pytest.raises(TypeError, match="not the config of a registered model family"):
        family_of(object())
    assert family_of_diffusers({"_class_name": "CogVideoXTransformer3DModel"}) is FAMILIES["cogvideox"]
    with pytest.raises(ValueError, match="diffusers class 'UNet2DModel' has no cpdit family"):
        family_of_diffusers({"_class_name": "UNet2DModel"})


def test_tensor_parallel_check_names_the_module():
    family = FAMILIES["cogvideox"]
    with torch.device("meta"):
        model = family.build(family.config("tiny", {"ff_inner_dim": 33}))
    check_tensor_parallel(model, dict(family.tp_plan), 3)
    with pytest.raises(ValueError, match=r"size=2 does not divide the width 33 of blocks\.0\.ff\.proj_in"):
        check_tensor_parallel(model, dict(family.tp_plan), 2)
    with pytest.raises(ValueError, match="does not divide model.num_attention_heads=6"):
        check_tensor_parallel(model, dict(family.tp_plan), 5)


def _loss_targets_follow_the_model(rank, world, name):
    """Under cp the job shards its loss targets with the handle (Parallelized.local_frames); for every family those
    are exactly the frames of the model's local output (the Phenaki family binds its sequence without text)."""
    from parallel.dims import ParallelDims
    from parallel.parallelize import materialize, parallelize_job
    from parallel.state import load_full_state_dict

    family = FAMILIES[name]
    preset = next(iter(family.presets))
    dims = ParallelDims(world, cp_size=world, model_parallel_size=1)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = family.build(family.presets[preset]).double()
    handle = parallelize_job(model, None, dims, mesh, layout="zigzag")
    materialize(model, "cpu", seed=1)
    gen = torch.Generator().manual_seed(0)  # random weights: CogVideoX starts adaLN-zero, a zero output
    load_full_state_dict(
        model,
        {
            n: torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3
            for n, p in family.build(family.presets[preset]).named_parameters()
        },
    )
    c = model.config
    x = torch.randn(1, 7, c.in_channels, 8, 8, generator=gen, dtype=torch.float64)  # 7 frames: uneven over 2 ranks
    text = torch.randn(1, 5, c.text_embed_dim, generator=gen, dtype=torch.float64)
    t = torch.tensor([11.0], dtype=torch.float64)
    with torch.no_grad():
        full, local = model(x, text, t), model(x, text, t, return_local=True)
    assert local.shape[1] < full.shape[1] and (full[:, 0] - full[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(local, handle.local_frames(full), rtol=0, atol=0)
    del model, mesh


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_targets_are_the_frames_the_model_returns(tmp_path, name):
    from distributed_helpers import run_ranks

    run_ranks(_loss_targets_follow_the_model, 2, tmp_path, name)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_random_initial_tensor_is_distinct(name):
    """Every parameter's random initial value (LoRA A matrices included) differs from every other's, at
    CogVideoX-5B depth (42 blocks) with tiny widths: per-name seeds that collide start two matrices equal."""
    family = FAMILIES[name]
    preset = "tiny" if "tiny" in family.presets else next(iter(family.presets))  # the smallest
    depth = {f.name for f in fields(family.config_class)} & {"num_layers", "depth"}
    config = family.config(preset, {k: 42 for k in depth})
    model = family.build(config)
    if family.lora:
        add_lora(model, 2)
    model.init_weights(seed=3)
    seen: dict[bytes, str] = {}
    random = 0
    for param_name, p in model.named_parameters():
        flat = p.detach().flatten()
        if flat.numel() < 2 or bool((flat == flat[0]).all()):  # zeros, ones: constant by design
            continue
        random += 1
        key = flat.to(torch.float64).numpy().tobytes()
        assert key not in seen, f"{param_name} starts equal to {seen[key]}"
        seen[key] = param_name
    blocks = sum(1 for n, _ in model.named_parameters() if n.startswith("blocks.41."))
    assert blocks and random > 42  # the depth took: the last block exists and its matrices were compared


def test_former_names_are_aliases():
    """README: `CPDiT` and `CPDiTConfig` are kept as aliases of the CogVideoX family's classes."""
    import cpdit
    from cpdit import CogVideoXConfig, CogVideoXDiT, CPDiT, CPDiTConfig

    assert CPDiT is CogVideoXDiT and CPDiTConfig is CogVideoXConfig and "CPDiT" in cpdit.__all__
