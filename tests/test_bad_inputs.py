# The bad-input suite: invalid topologies, launcher environments, config keys/types/values, shapes and files, each
# given to `cpdit-launch` as a user would. Every one must be answered by exit code 2 within seconds, before any
# process or process group exists, with a message naming the input (and, where there is one, the fix).
# Bad files found only by the workers (corrupt checkpoints, videos) are in test_faults.py and test_data.py.

import pytest

from launch.cli import main

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}

TINY_I2V = ["model.preset=tiny", "model.in_channels=6", "model.out_channels=3", "model.pos_embedding=rope"]

CASES = [
    # --- topologies ---
    ("cp x tp does not divide world", ["--cp-size", "3"], {}, "cp_size=3 x model_parallel_size=2 = 6 does not divide"),
    ("ulysses not dividing cp", ["--ulysses-size", "3"], {}, "ulysses_size=3 does not divide cp_size=2"),
    ("too few processes", ["--nproc-per-node", "2"], {}, "= 4 does not divide world_size=2"),
    ("multi-node without rendezvous", ["--nnodes", "2"], {}, "--nnodes > 1 needs --rdzv-endpoint"),
    ("zero cp", ["parallel.cp_size=0"], {}, "cp_size=0 must be >= 1"),
    (
        "tp not dividing heads",
        ["--cp-size", "1", "--model-parallel-size", "4"],
        {},
        "does not divide model.num_attention_heads=6",
    ),
    ("HSDP replicas do not divide", ["parallel.dp_replicate=3"], {}, "dp_replicate=3 does not divide"),
    ("injected rank outside world", ["debug.fail_rank=9"], {}, "debug.fail_rank=9 is not a rank"),
    (
        "compiled blocks with tensor parallelism",
        ["train.compile=true"],
        {},
        "train.compile=true with parallel.model_parallel_size=2: torch 2.13's compiler",
    ),
    # --- buckets and dynamic cp (issue #26) ---
    ("bucket not a triple", ["data.buckets=[[9,16]]"], {}, "data.buckets: [9, 16] is not [frames, height, width]"),
    ("bucket twice", ["data.buckets=[[9,16,16],[9,16,16]]"], {}, "data.buckets lists a bucket twice"),
    (
        "bucket off the VAE frame rule",
        ["first_stage.kind=vae", "data.num_frames=9", "data.buckets=[[9,16,16],[12,16,16]]"],
        {},
        "data.buckets[1]=12x16x16 (frames x height x width, checked as data.num_frames, data.height, data.width): "
        "data.num_frames=12 does not fit the VAE's frame rule",
    ),
    ("bucket off the patch grid", ["data.buckets=[[9,16,15]]"], {}, "data.buckets[0]=9x16x15 (frames x height"),
    ("bucket shorter than cp", ["data.buckets=[[9,16,16],[1,16,16]]"], {}, "data.num_frames=1 (1 latent frames) <"),
    ("token budget without buckets", ["data.token_budget=500"], {}, "data.token_budget=500 needs data.buckets"),
    ("dynamic cp without buckets", ["parallel.dynamic_cp=true"], {}, "parallel.dynamic_cp=True needs data.buckets"),
    (
        "bucket weights of another length",
        ["data.buckets=[[9,16,16],[5,16,16]]", "data.bucket_weights=[1]"],
        {},
        "must give one share >= 0 per bucket (2)",
    ),
    (
        "pinned degree not splitting cp",
        ["data.buckets=[[9,16,16],[5,16,16]]", "parallel.dynamic_cp=true", "parallel.cp_per_bucket=[2,3]"],
        {},
        "parallel.cp_per_bucket[1]=3 (data.buckets[1]=5x16x16): not a degree that splits cp_size=2; use one of [1, 2]",
    ),
    (
        "pinned degree without a clip per sub-group",
        ["data.buckets=[[9,16,16]]", "data.batch_size=1", "parallel.dynamic_cp=true", "parallel.cp_per_bucket=[1]"],
        {},
        "2 sub-groups but micro-batches of 1 clip(s); every sub-group needs a clip",
    ),
    (
        "pins of another length",
        ["data.buckets=[[9,16,16]]", "parallel.dynamic_cp=true", "parallel.cp_per_bucket=[1,2]"],
        {},
        "gives 2 degrees for the 1 data.buckets",
    ),
    (
        "dynamic cp on a family the planner does not model",
        ["model.preset=phenaki-like", "data.buckets=[[9,16,16]]", "parallel.dynamic_cp=true"],
        {},
        "pin the degrees with parallel.cp_per_bucket",
    ),
    (
        "buckets from a precomputed directory",
        ["data.dataset=precomputed", "data.path={tmp}", "data.buckets=[[9,16,16]]"],
        {},
        "data.buckets with data.dataset='precomputed'",
    ),
    # --- launcher environments (cpdit-launch running inside torchrun / mpirun / srun) ---
    ("torchrun env without port", [], {**TORCHRUN, "MASTER_PORT": ""}, "MASTER_PORT"),
    ("rank beyond world", [], {**TORCHRUN, "RANK": "4"}, "RANK=4 is not below WORLD_SIZE=4"),
    ("world not an integer", [], {**TORCHRUN, "WORLD_SIZE": "four"}, "WORLD_SIZE='four' is not an integer"),
    ("port out of range", [], {**TORCHRUN, "MASTER_PORT": "70000"}, "is not a TCP port"),
    ("launcher world too small", [], {**TORCHRUN, "WORLD_SIZE": "2"}, "does not divide world_size=2"),
    ("Open MPI without size", [], {"OMPI_COMM_WORLD_RANK": "0"}, "without OMPI_COMM_WORLD_SIZE"),
    ("MPICH without size", [], {"PMI_RANK": "0"}, "PMI_SIZE is missing"),
    (
        "SLURM task counts",
        [],
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x3)"},
        "sums to 12",
    ),
    (
        "SLURM host list",
        [],
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu-[003-00"},
        "unbalanced",
    ),
    # --- config keys, types and values ---
    ("typo in a key", ["parallel.cp_sise=2"], {}, "did you mean 'parallel.cp_size'"),
    ("unknown section", ["paralel.cp_size=2"], {}, "unknown config key 'paralel'"),
    ("wrong type", ["train.steps=many"], {}, "bad value for 'train.steps'"),
    ("not a choice", ["parallel.attention=flash"], {}, "parallel.attention='flash' is not one of"),
    ("mixed precision", ["train.mixed_precision=fp8"], {}, "train.mixed_precision='fp8' is not one of"),
    ("unknown preset", ["model.preset=huge"], {}, "model preset 'huge' is unknown"),
    ("zero batch", ["data.batch_size=0"], {}, "data.batch_size=0 must be > 0"),
    ("betas", ["optim.betas=[0.9]"], {}, "optim.betas=[0.9] must be two numbers"),
    ("EMA decay", ["train.ema_decay=1.5"], {}, "train.ema_decay=1.5 must be in [0.0, 1.0)"),
    ("caption dropout", ["train.ucg_rate=-0.1"], {}, "train.ucg_rate=-0.1 must be in"),
    ("watchdog factor", ["dist.watchdog_factor=0.5"], {}, "dist.watchdog_factor=0.5 must be > 1"),
    ("nccl without CUDA", ["dist.backend=nccl"], {}, "dist.backend='nccl' needs CUDA"),
    ("missing config file", ["missing.yaml"], {}, "config file 'missing.yaml' does not exist"),
    ("broken YAML", ["{tmp}/broken.yaml"], {}, "not valid YAML"),
    # --- shapes ---
    ("height vs patch size", ["data.height=17"], {}, "data.height=17 is not divisible by the patch size 4"),
    (
        "fewer frames than cp ranks",
        ["data.num_frames=1"],
        {},
        "data.num_frames=1 (1 latent frames) < parallel.cp_size=2",
    ),
    (
        "VAE frame rule",
        ["first_stage.kind=vae", "data.num_frames=8"],
        {},
        "data.num_frames=8 does not fit the VAE's frame rule: use 1 + 8k frames (9, 17, 25",
    ),
    (
        "diffusers VAE semantics under cp",
        ["first_stage.kind=vae", "data.num_frames=9", "first_stage.semantics=diffusers"],
        {},
        "first_stage.semantics=diffusers evaluates whole clips in diffusers' batches on one rank: set first_stage.cp_size=1 (is None)",
    ),
    (
        "VAE even latent count",
        ["first_stage.kind=vae", "data.num_frames=13"],
        {},
        "data.num_frames=13 encodes to 4 latent frames, an even count that decodes to 16 frames, not 13: use 1 + 8k",
    ),
    (
        "VAE downsampling vs size",
        ["first_stage.kind=vae", "data.num_frames=9", "data.height=12"],
        {},
        "use a multiple of 16",
    ),
    (
        "VAE cp size",
        ["first_stage.kind=vae", "data.num_frames=9", "first_stage.cp_size=3"],
        {},
        "first_stage.cp_size=3",
    ),
    (
        "VAE checkpoint missing",
        ["first_stage.kind=vae", "data.num_frames=9", "first_stage.ckpt_path={tmp}/nowhere"],
        {},
        "first_stage.ckpt_path='{tmp}/nowhere' is not a directory",
    ),
    ("RoPE head dim", ["model.pos_embedding=rope", "model.attention_head_dim=24"], {}, "attention_head_dim % 16"),
    (
        "latent channels in pixel space",
        ["model.in_channels=4"],
        {},
        "model.in_channels=4, but the first stage (pixel) gives 3 channels",
    ),
    ("dataset smaller than a batch", ["data.num_samples=1"], {}, "data.num_samples=1 is less than data.batch_size=8"),
    ("heads vs tp", ["model.num_attention_heads=5"], {}, "does not divide model.num_attention_heads=5"),
    (
        "factorized heads vs tp",
        ["model.preset=svd-like", "model.num_attention_heads=3", "model.attention_head_dim=32"],
        {},
        "does not divide model.num_attention_heads=3",
    ),
    (
        "factorized family with LoRA",
        ["model.preset=svd-like", "model.lora_rank=4"],
        {},
        "model.lora_rank is for the CogVideoX presets",
    ),
    (
        "Phenaki heads vs tp",
        ["model.preset=phenaki-like", "model.num_attention_heads=3"],
        {},
        "does not divide model.num_attention_heads=3",
    ),
    (
        "Phenaki family with LoRA",
        ["model.preset=phenaki-like", "model.lora_rank=4"],
        {},
        "model.lora_rank is for the CogVideoX presets",
    ),
    # --- files ---
    (
        "dataset directory missing",
        ["data.dataset=folder", "data.path={tmp}/nowhere"],
        {},
        "data.path='{tmp}/nowhere' is not a directory",
    ),
    (
        "dataset without captions",
        ["data.dataset=folder", "data.path={tmp}/uncaptioned"],
        {},
        "has a labels/<name>.txt caption",
    ),
    (
        "T5 directory missing",
        ["text.encoder=t5", "text.path={tmp}/nowhere"],
        {},
        "text.path='{tmp}/nowhere' is not a directory",
    ),
    ("T5 without config.json", ["text.encoder=t5", "text.path={tmp}/empty"], {}, "has no config.json"),
    ("T5 config not JSON", ["text.encoder=t5", "text.path={tmp}/badt5"], {}, "config.json is not valid JSON"),
    ("T5 without safetensors", ["text.encoder=t5", "text.path={tmp}/t5nobin"], {}, "has no *.safetensors weights"),
    (
        "resume path missing",
        ["checkpoint.resume={tmp}/nowhere"],
        {},
        "checkpoint.resume='{tmp}/nowhere' is not a directory",
    ),
    ("resume path incomplete", ["checkpoint.resume={tmp}/empty"], {}, "has no meta.json"),
    (
        "pretrained missing",
        ["model.pretrained={tmp}/nowhere"],
        {},
        "model.pretrained='{tmp}/nowhere' is not a directory",
    ),
    (
        "prompts file missing",
        ["sample.prompts_file={tmp}/nope.txt"],
        {},
        "sample.prompts_file='{tmp}/nope.txt' does not exist",
    ),
    ("prompts file empty", ["sample.prompts_file={tmp}/blank.txt"], {}, "holds no prompt"),
    ("YAML top level is a list", ["{tmp}/list.yaml"], {}, "the top level must be a mapping of sections"),
    ("output dir below a file", ["train.output_dir={tmp}/afile/runs"], {}, "is a file, so the run directory"),
    (
        "rendezvous port not a number",
        ["--nnodes", "2", "--rdzv-endpoint", "localhost:notaport"],
        {},
        "is not host:port",
    ),
    ("negative epsilon", ["optim.eps=-1e-08"], {}, "optim.eps=-1e-08 must be > 0"),
    (
        "pretrained with pickle weights only",
        ["model.pretrained={tmp}/binonly"],
        {},
        "no *.safetensors weights (cpdit never unpickles",
    ),
    ("pretrained index pointing outside", ["model.pretrained={tmp}/outside"], {}, "are not *.safetensors files inside"),
    (
        "VAE with pickle weights only",
        ["first_stage.kind=vae", "data.num_frames=9", "first_stage.ckpt_path={tmp}/binonly"],
        {},
        "no *.safetensors weights",
    ),
    (
        "svd knob on another family",
        ["model.merge_strategy=fixed"],
        {},
        "model.merge_strategy is a knob of the factorized family (model.preset=svd-like), not of model.preset='demo'",
    ),
    (
        "svd merge strategy",
        ["model.preset=svd-like", "model.merge_strategy=bogus"],
        {},
        "merge_strategy='bogus' is not fixed, learned or learned_with_images",
    ),
    (
        "svd width vs GroupNorm",
        ["model.preset=svd-like", "model.num_attention_heads=3"],
        {},
        "num_attention_heads x attention_head_dim = 48 must be a multiple of 32",
    ),
    ("svd temporal blocks", ["model.preset=svd-like", "model.temporal_blocks=0"], {}, "temporal_blocks=0 must be >= 1"),
    ("node range not numbers", ["--nnodes", "two"], {}, "--nnodes='two' is not a number of nodes"),
    ("node range reversed", ["--nnodes", "2:1", "--rdzv-endpoint", "localhost:29400"], {}, "need 1 <= MIN <= MAX"),
    (
        "elastic range a node count cannot run",
        ["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-endpoint", "localhost:29400"],
        {},
        "--nnodes=1:2: with 1 node(s) (2 ranks) the job cannot run",
    ),
    ("decay steps zero", ["optim.decay_steps=0"], {}, "optim.decay_steps=0 must be >= 1"),
    ("num_frames zero", ["data.num_frames=0"], {}, "data.num_frames=0 must be > 0"),
    ("keep no checkpoint", ["checkpoint.keep_last=0"], {}, "checkpoint.keep_last=0 must be > 0"),
    ("negative weight decay", ["optim.weight_decay=-1"], {}, "optim.weight_decay=-1.0 must be in [0.0, inf]"),
    (
        "resume path is a file",
        ["checkpoint.resume={tmp}/afile"],
        {},
        "is not a directory; a complete checkpoint directory",
    ),
    (
        "CogVideoX 1.5 frames fewer than cp",
        ["model.pos_embedding=rope", "model.patch_size_t=2", "data.num_frames=2"],
        {},
        "data.num_frames=2 (2 latent frames in 1 patch-frame(s) of 2 (model.patch_size_t)) < parallel.cp_size=2",
    ),
    (
        "learned position table of another shape",
        ["model.pretrained={tmp}/i2v"],
        {},
        "model.pretrained={tmp}/i2v has a learned position table (use_learned_positional_embeddings) for 3 frames "
        "of 8x8 and 16 text tokens only: data.num_frames=8 (needs 3), data.height=16 (needs 8), data.width=16 "
        "(needs 8); set data.num_frames=3 data.height=8 data.width=8",
    ),
    (
        "image-to-video checkpoint without images",
        ["model.pretrained={tmp}/i2v", "data.num_frames=3", "data.height=8", "data.width=8"],
        {},
        "model.pretrained={tmp}/i2v samples from an image: prompt 'a red circle moving left' has none; give "
        "sample.images (one per prompt) or image<TAB>prompt lines in sample.prompts_file",
    ),
    (
        "5B-I2V preset at another shape",
        ["model.preset=cogvideox-5b-i2v"],
        {},
        "model.preset=cogvideox-5b-i2v has a learned position table (use_learned_positional_embeddings) for 13 frames "
        "of 60x90 and 226 text tokens only",
    ),
    (
        "1.5 image-to-video preset without images",
        ["model.preset=cogvideox1.5-5b-i2v"],
        {},
        "model.preset=cogvideox1.5-5b-i2v samples from an image: prompt 'a red circle moving left' has none",
    ),
    (
        "image-to-video latent cache",
        [
            "model.preset=cogvideox1.5-5b-i2v",
            "sample.at_end=false",
            "first_stage.kind=vae",
            "data.num_frames=9",
            "first_stage.preset=tiny",
            "data.latent_cache_dir={tmp}/lc",
        ],
        {},
        "train.image_noise='step' noises its first frame anew each step, which data.latent_cache_dir cannot keep: set train.image_noise=clip",
    ),
    (
        "image-to-video prompts without images",
        TINY_I2V,
        {},
        "samples from an image: prompt 'a red circle moving left' has none",
    ),
    (
        "image-to-video captions for a text-to-video model",
        ["data.dataset=synthetic_i2v"],
        {},
        "data.dataset='synthetic_i2v' captions name only the motion (colour, shape and start are in the first "
        "frame), but model.preset=demo is text-to-video and never sees it; use data.dataset='synthetic', or an "
        "image-to-video model (model.in_channels = 2 x model.out_channels)",
    ),
    (
        "image-to-video image of a prompts file missing (relative to the file)",
        [*TINY_I2V, "sample.prompts_file={tmp}/i2v_prompts.txt"],
        {},
        "the image '{tmp}/missing.png' of prompt 'a shape moving left' does not exist",
    ),
    (
        "image-to-video image missing",
        [*TINY_I2V, "sample.prompts=[x]", "sample.images=[{tmp}/nope.png]"],
        {},
        "the image '{tmp}/nope.png' of prompt 'x' does not exist",
    ),
    (
        "image-to-video image of another size",
        [*TINY_I2V, "sample.prompts=[x]", "sample.images=[{tmp}/small.png]"],
        {},
        "image '{tmp}/small.png' is 8x8 (width x height); the clips are 16x16 (data.width x data.height)",
    ),
    (
        "image-to-video image unreadable",
        [*TINY_I2V, "sample.prompts=[x]", "sample.images=[{tmp}/garbage.png]"],
        {},
        "image '{tmp}/garbage.png' cannot be read",
    ),
    (
        "image count differs from prompts",
        [*TINY_I2V, "sample.images=[{tmp}/small.png]"],
        {},
        "sample.images has 1 images for 4 prompts (sample.prompts): give one per prompt",
    ),
    (
        "images for a text-to-video model",
        ["sample.prompts=[x]", "sample.images=[{tmp}/small.png]"],
        {},
        "are for image-to-video models; model.preset=demo is text-to-video: remove the images",
    ),
    (
        "unknown key with a suggestion",
        ["sample.num_frames=3"],
        {},
        "unknown config key 'sample.num_frames'; did you mean 'data.num_frames'?",
    ),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "broken.yaml").write_text("parallel: [1, 2\n")
    (root / "empty").mkdir()
    (root / "uncaptioned" / "videos").mkdir(parents=True)
    (root / "uncaptioned" / "labels").mkdir()
    (root / "uncaptioned" / "videos" / "a.mp4").write_bytes(b"\0" * 16)
    (root / "uncaptioned" / "labels" / "b.txt").write_text("a caption for another video")
    (root / "badt5").mkdir()
    (root / "badt5" / "config.json").write_text("{not json")
    (root / "t5nobin").mkdir()
    (root / "t5nobin" / "config.json").write_text('{"d_model": 32}')
    (root / "t5nobin" / "pytorch_model.bin").write_bytes(b"pickle")
    (root / "blank.txt").write_text("\n  \n")
    (root / "list.yaml").write_text("- model\n- parallel\n")
    (root / "afile").write_text("not a directory")
    (root / "binonly").mkdir()
    (root / "binonly" / "config.json").write_text("{}")
    (root / "binonly" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (root / "outside").mkdir()
    (root / "outside" / "config.json").write_text("{}")
    (root / "outside" / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../elsewhere.safetensors"}}')
    _diffusers_dir(root / "i2v", in_channels=6, out_channels=3, use_learned_positional_embeddings=True)
    import imageio.v2 as imageio
    import numpy as np

    imageio.imwrite(root / "small.png", np.zeros((8, 8, 3), np.uint8))
    (root / "garbage.png").write_bytes(b"not a png")
    (root / "i2v_prompts.txt").write_text("missing.png\ta shape moving left\n")  # relative: beside the file
    return root


def _diffusers_dir(path, **arch):
    """A tiny CogVideoX transformer in diffusers' layout, written by cpdit's own converters (no diffusers needed):
    5B-I2V-shaped, for the pixel first stage (3 channels), 3 frames of 8 x 8, 16 text tokens."""
    import json

    from safetensors.torch import save_file

    from cpdit import CogVideoXConfig, CogVideoXDiT
    from cpdit.models.cogvideox.convert import config_to_diffusers, state_dict_to_diffusers

    config = CogVideoXConfig.preset(
        "tiny", pos_embedding="rope", text_embed_dim=32, sample_frames=9, max_text_seq_length=16, **arch
    )
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config_to_diffusers(config)))
    save_file(
        state_dict_to_diffusers(CogVideoXDiT(config).state_dict()), str(path / "diffusion_pytorch_model.safetensors")
    )


@pytest.mark.parametrize("name, argv, environ, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_anything_starts(name, argv, environ, message, tmp, capsys, nothing_starts):
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    environ = {k: v for k, v in environ.items() if v}
    flags = [a for i, a in enumerate(argv) if a.startswith("--") or (i and argv[i - 1].startswith("--"))]
    rest = argv[len(flags) :]  # launcher flags first, then key=value overrides and YAML files
    code = main([*flags, "train", *rest], environ=environ)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.replace("{tmp}", str(tmp)) in err, err
    assert err.startswith("cpdit-launch: error: ") and "Traceback" not in err


def test_the_suite_is_large_enough():
    assert len(CASES) >= 75


def test_sample_before_training_is_refused_by_the_launcher(tmp, capsys, nothing_starts):
    code = main(["sample", f"train.output_dir={tmp}/never-trained"], environ={})
    err = capsys.readouterr().err
    assert code == 2 and "no complete checkpoint under" in err and "train first" in err, err
