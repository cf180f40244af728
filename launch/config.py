# Typed configuration of a cpdit job. The defaults ARE the embedded default job (tiny model, synthetic data,
# 4 processes with cp_size=2 x model_parallel_size=2 on CPU/gloo). YAML files hold only differences from these
# defaults; they are merged left to right, then `key=value` overrides. Unknown keys and wrong types fail at
# start-up, naming the key.
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from parallel.attention import STRATEGIES
from parallel.dims import TopologyError, validate_degrees

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration key, type or combination is wrong; the message names the key and the fix."""


@dataclass
class SharedModelKnobs:
    preset: str = "demo"
    """Named architecture: `demo` (the default job's small model), `tiny` (the tests'), `cogvideox-2b`,
    `cogvideox-5b` (full 3D attention), `cogvideox-5b-i2v`, `cogvideox1.5-5b`, `cogvideox1.5-5b-i2v`; `svd-like`
    (factorized spatial/temporal blocks); `phenaki-like` (frame-causal attention with ALiBi, continuous position
    bias and null keys/values). Fields below override it when set."""
    num_layers: int | None = None
    """Transformer blocks (None: the preset's)."""
    num_attention_heads: int | None = None
    """Attention heads (None: the preset's). Must be >= model_parallel_size."""
    attention_head_dim: int | None = None
    """Width of one head (None: the preset's)."""
    in_channels: int | None = None
    """Latent channels (None: the preset's)."""
    patch_size: int | None = None
    """Spatial patch size (None: the preset's)."""
    text_embed_dim: int | None = None
    """Width of the text encoder's output (None: the preset's)."""
    gradient_checkpointing: bool = False
    """Recompute each block in the backward (activation checkpointing)."""
    out_channels: int | None = None
    """Output channels (None: in_channels)."""
    pretrained: str | None = None
    """A diffusers CogVideoXTransformer3DModel directory (config.json + safetensors) to start from."""
    lora_rank: int = 0
    """LoRA rank on q/k/v/out of every block (0: full fine-tuning). With LoRA only the adapters train."""
    lora_alpha: float | None = None
    """LoRA scale numerator (None: = lora_rank)."""


def _family_knobs() -> list[tuple[str, Any, Any]]:
    """The knobs each model family declares (cpdit/models/family.py ModelFamily.job_knobs), as dataclass fields:
    type | None, default None (the preset's value), the config field's docstring in the metadata. Two families may
    share a knob only with one type."""
    from cpdit.models.registry import FAMILIES

    shared = {f.name for f in fields(SharedModelKnobs)}
    knobs: dict[str, Any] = {}
    for family in FAMILIES.values():
        for knob in family.knobs():
            if knob.name in shared:
                raise TypeError(f"the {family.title} family's job knob {knob.name!r} is a shared model knob")
            if knob.name in knobs and knobs[knob.name][1] != knob.type | None:
                raise TypeError(f"job knob {knob.name!r} has two types: {knobs[knob.name][1]} and {knob.type}")
            doc = knob.doc if knob.name not in knobs else f"{knobs[knob.name][2].metadata['doc']}; {knob.doc}"
            knobs[knob.name] = (knob.name, knob.type | None, field(default=None, metadata={"doc": doc}))
    return list(knobs.values())


ModelConfig = make_dataclass("ModelConfig", _family_knobs(), bases=(SharedModelKnobs,))
ModelConfig.__doc__ = """The job's `model:` section: the knobs of every family (SharedModelKnobs) and the ones a family
declares for itself (cpdit/models/<family>/__init__.py job_knobs; their docs in `fields(ModelConfig)` metadata)."""
ModelConfig.__module__ = __name__


@dataclass
class ParallelConfig:
    cp_size: int = 2
    """Context-parallel degree: the frames of each video are split over this many ranks."""
    model_parallel_size: int = 2
    """Tensor-parallel degree: attention heads and MLP columns are split over this many ranks."""
    ulysses_size: int = 1
    """Part of cp_size done with all-to-all (Ulysses); cp_size / ulysses_size ranks form the ring."""
    dp_replicate: int = 1
    """Model replicas (HSDP); the remaining data-parallel ranks shard parameters with FSDP."""
    attention: str = "auto"
    """Context-parallel attention strategy: auto, ring, ulysses, usp or allgather."""
    ring_head_chunks: int | None = None
    """Ring passes per attention call, over chunks of heads (None: 8 when the local K and V take 4 MiB or more, else
    1; capped at the heads per rank): more passes keep fewer K/V blocks in flight (memory) for more, smaller
    messages (latency)."""
    layout: str = "contiguous"
    """How frames are split over cp ranks: contiguous, or zigzag (load balance for frame-causal)."""
    fsdp: bool = True
    """Shard parameters, gradients and optimizer state with FSDP2 over dp_shard x cp."""
    dynamic_cp: bool = False
    """With data.buckets: run each bucket at its own context-parallel degree c dividing cp_size (the cp group splits
    into cp_size / c sub-groups, each over its own clips): the smallest degree whose micro-batch fits the memory cap
    as `cpdit-launch plan` predicts it, with the planner's measured error as margin, unless cp_per_bucket pins it."""
    cp_per_bucket: list[int] | None = None
    """With dynamic_cp: the cp degree of each entry of data.buckets, in order (None: chosen by the planner)."""
    dynamic_cp_memory_gib: float | None = None
    """With dynamic_cp: the memory of one device the degrees are chosen for (90% of it is used, as by `cpdit-launch
    plan`); None: the GPU's own, or on CPU the machine's memory divided by its processes."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: auto (nccl with CUDA, else gloo), nccl or gloo."""
    timeout_s: float = 600.0
    """Process-group timeout: a collective waiting longer fails the job instead of hanging it."""
    nproc_per_node: int = 4
    """Processes `cpdit-launch` starts per node when it launches torchrun itself."""
    shutdown_timeout_s: float = 120.0
    """After SIGTERM/SIGUSR1, how long torchrun's agent waits for the workers to checkpoint before killing them."""
    watchdog: bool = True
    """Hang watchdog: a step far slower than usual dumps every rank's stacks to <run>/hang/ and ends the job."""
    watchdog_factor: float = 10.0
    """A step is hung after this many times the median of the recent step times..."""
    watchdog_min_s: float = 120.0
    """...but never sooner than this many seconds."""
    watchdog_warmup_s: float = 600.0
    """Limit for the first steps (compilation, first all-gathers) before a median exists."""


@dataclass
class FirstStageConfig:
    kind: str = "pixel"
    """`pixel`: the model works on RGB frames (no weights needed); `vae`: the CogVideoX causal 3D VAE (frozen)."""
    ckpt_path: str | None = None
    """vae: a diffusers AutoencoderKLCogVideoX directory (config.json + safetensors) or a pipeline with vae/; None:
    a randomly initialised VAE of `preset` (for tests and smoke runs)."""
    preset: str = "tiny"
    """vae without ckpt_path: tiny or cogvideox."""
    cp_size: int | None = None
    """Ranks that split a clip's frames in the VAE: None (the model's parallel.cp_size) or 1 (every rank encodes
    whole clips)."""
    scale_factor: float | None = None
    """Latent scale (None: the VAE's scaling_factor, 1.15258426 for CogVideoX)."""
    chunk_latents: int = 0
    """VAE on one device (first_stage.cp_size=1 or no cp): stream the clip in chunks of this many latent frames,
    exactly (one pass per GroupNorm; bounded memory, slower). 0: whole clips."""
    semantics: str = "clip"
    """`clip`: GroupNorm statistics over the whole clip (CogVideoX's own context-parallel VAE; what cp and
    chunk_latents compute). `diffusers`: diffusers' AutoencoderKLCogVideoX as shipped (8-frame encode and 2-latent
    decode batches, statistics per batch), for latents precomputed with diffusers; needs first_stage.cp_size=1."""


@dataclass
class TextConfig:
    encoder: str = "hashed"
    """`hashed` (trainable hashed-word embedder, no weights needed) or `t5` (frozen, from text.path)."""
    path: str | None = None
    """Local T5 directory (config.json, safetensors weights, tokenizer) for encoder=t5; nothing is downloaded."""
    cache_dir: str | None = None
    """On-disk cache of T5 embeddings (one safetensors file per caption)."""


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    """`synthetic` (built-in moving shapes with captions), `synthetic_i2v` (the same for image-to-video models:
    captions name only the motion, the first frame shows colour, shape and start), `folder` (videos/*.mp4 +
    labels/*.txt) or `precomputed` (a directory written by `cpdit-launch precompute`: posteriors and, with a frozen
    T5, text embeddings; trains without the VAE or T5 in memory)."""
    path: str | None = None
    """Dataset root for `folder`; the precompute directory for `precomputed`."""
    num_frames: int = 8
    """Pixel frames per clip (latent frames follow the first stage's temporal compression)."""
    height: int = 16
    """Frame height in pixels."""
    width: int = 16
    """Frame width in pixels."""
    fps: float = 8.0
    """Frame rate clips are sampled at."""
    batch_size: int = 8
    """Clips per data-parallel rank per micro-step."""
    num_samples: int = 256
    """Clips in a synthetic dataset."""
    random_crop: bool = False
    """folder dataset: random temporal offset and spatial crop (else from the start, centered)."""
    latent_cache_dir: str | None = None
    """With first_stage.kind=vae: keep each clip's VAE posterior here and skip the VAE when it is cached."""
    buckets: list[list[int]] | None = None
    """Clip shapes [frames, height, width] in pixels (e.g. [[9, 16, 24], [17, 16, 16], [33, 24, 16]]): a folder
    dataset's video goes to the bucket of nearest aspect ratio, then the longest it covers, and is resized and cropped
    to it (shorter than every bucket: skipped and counted); the synthetic datasets draw each clip's bucket. A
    micro-batch holds clips of one bucket (data.token_budget sets how many). None: every clip is data.num_frames x
    data.height x data.width."""
    bucket_weights: list[float] | None = None
    """Synthetic datasets with data.buckets: the share of clips drawn for each bucket (None: equal shares)."""
    token_budget: int = 0
    """With data.buckets: tokens (text + latent patches) per cp group per micro-batch; a bucket's micro-batch is as
    many clips as fit, at least one (`cpdit-launch plan` recommends a budget). 0: data.batch_size clips of every
    bucket."""


@dataclass
class PrecomputeConfig:
    output_dir: str | None = None
    """`cpdit-launch precompute`: the directory it writes (index.json and shards); train from it with
    data.dataset=precomputed data.path=DIR. Rerun the same command to finish an interrupted precompute."""
    shard_size: int = 16
    """Clips per safetensors shard: the unit written at once, and redone after a kill."""


@dataclass
class OptimConfig:
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (across all shards) to this; 0 disables."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr x min_lr_ratio at the last step (SAT LambdaWarmUpCosineScheduler)."""
    decay_steps: int | None = None
    """Step at which the cosine decay ends (SAT's max_decay_steps); None: train.steps. Set it to train a long
    schedule in several shorter runs."""
    start_lr_ratio: float = 0.0
    """Warm-up starts at lr x start_lr_ratio at step 0 (SAT's lr_start)."""


@dataclass
class TrainConfig:
    steps: int = 600
    """Optimizer steps."""
    seed: int = 0
    """Base seed; data-parallel ranks derive distinct seeds from it."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    mixed_precision: str = "no"
    """no, bf16 or fp16: autocast in that dtype, and under FSDP2 its parameters all-gathered in that dtype with fp32
    master weights, gradient reduce-scatter and AdamW state (parallel/fsdp.py precision_policy)."""
    compile: bool = False
    """torch.compile each block of the DiT (torchtitan's regional compile; parallel/parallelize.py): the
    context-parallel attention and the other collectives run eagerly between compiled regions. Not with
    parallel.model_parallel_size > 1 (refused: torch 2.13's compiler rejects tensor-parallel blocks' DTensor
    outputs)."""
    log_every: int = 1
    """Log metrics every N steps."""
    output_dir: str = "runs"
    """Parent of the run directory."""
    run_name: str = "default"
    """Run directory name under output_dir."""
    ema_decay: float = 0.99
    """EMA of the DiT weights (sharded like the parameters); 0 disables."""
    text_max_length: int = 16
    """Text tokens per caption (226 for T5 as in CogVideoX)."""
    num_idx: int = 1000
    """Diffusion timesteps (DDPM discretization)."""
    shift_scale: float = 1.0
    """SNR shift of CogVideoX's ZeroSNRDDPMDiscretization (CogVideoX: 3.0 for 480x720 latents; the default job's
    16x16 pixel frames need no shift toward noise)."""
    ucg_rate: float = 0.1
    """Probability of dropping the caption (classifier-free guidance training)."""
    image_dropout: float = 0.05
    """Image-to-video models: probability that a sample's image latents are zeros (SAT's noised_image_dropout)."""
    image_noise: str = "step"
    """Image-to-video models: when the conditioning frame's pixel noise is drawn. "step": anew each step (SAT's
    training); "clip": once per clip, from train.seed and the clip's index (diffusers' I2V fine-tuning script, which
    encodes the noised image once before training), what data.latent_cache_dir keeps."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    loss_scale: float = 65536.0
    """fp16: initial dynamic loss scale (halved on overflow, doubled after loss_scale_window good steps)."""
    loss_scale_window: int = 1000
    """fp16: good steps before the loss scale grows."""
    export: bool = True
    """Write export/model.safetensors and a diffusers-layout export/diffusers/ at the end."""


@dataclass
class CheckpointConfig:
    every: int = 200
    """Save every N steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept."""
    resume: str = "auto"
    """`auto` (newest complete checkpoint of this run, if any), `none`, or a checkpoint path."""


@dataclass
class LoggingConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "cpdit"
    """wandb project name."""


@dataclass
class SampleConfig:
    prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle moving left",
            "a blue square moving down",
            "a yellow triangle moving right",
            "a green circle moving up",
        ]
    )
    """Prompts to sample (or use prompts_file)."""
    prompts_file: str | None = None
    """A text file with one prompt per line (image-to-video: `image<TAB>prompt` lines)."""
    images: list[str] = field(default_factory=list)
    """Image-to-video models: one image per prompt of sample.prompts, in the same order (data.width x
    data.height files)."""
    image_sigma: float = 0.0
    """Image-to-video: pixel noise added to the conditioning image before encoding (0: none)."""
    sampler: str = "ddim"
    """ddim or dpmpp_2m."""
    num_steps: int = 25
    """Sampling steps."""
    guidance_scale: float = 6.0
    """Classifier-free guidance scale."""
    dynamic_cfg: bool = True
    """CogVideoX's dynamic CFG (guidance ramps up along the trajectory)."""
    at_end: bool = True
    """`train` samples the prompts into samples/ when it finishes."""
    every: int = 0
    """`train` also samples the prompts every N optimizer steps (0: never) into samples/step_N/, with the EMA weights,
    logged to wandb at their step and, on the synthetic datasets, judged into metrics.jsonl (launch/job/validation.py);
    a failure is reported and training goes on."""
    seed: int = 42
    """Seed of the initial noise."""
    checkpoint: str | None = None
    """`cpdit-launch sample`: checkpoint directory (None: newest of train.output_dir/train.run_name)."""


@dataclass
class DebugConfig:
    """Fault-injection aids for tests. Not for production runs."""

    fail_at_step: int | None = None
    """Raise at the start of this (0-based) step on rank `fail_rank` (a worker dying mid-run)."""
    fail_rank: int = 0
    """The rank that fails, hangs or hits the I/O error."""
    hang_at_step: int | None = None
    """Rank `fail_rank` stops making progress at the start of this (0-based) step (a stuck worker)."""
    nan_at_step: int | None = None
    """Pretend the loss of this (0-based) step is NaN."""
    fail_save_at_step: int | None = None
    """Make the checkpoint save after this step fail, as `fail_save` says."""
    fail_save: str = "crash"
    """`crash`: every rank raises after the shards are written, before the rename; `io_error`: rank `fail_rank`'s
    write fails like a full disk."""
    fail_sample: str | None = None
    """Rank `fail_rank` raises in sampling: `prompt` while preparing its first prompt (local work: the ranks agree
    and stop sampling together), `forward` in its first denoising forward (a collective: the job stops)."""
    step_sleep_s: float = 0.0
    """Sleep this long in every step, and in every shard of a precompute (slow runs for signal and kill tests)."""
    every_attempt: bool = False
    """Inject in every elastic attempt (default: only the first, so a restarted job gets past the fault)."""
    dump_resumed_state: bool = False
    """After resuming, write the loaded model, optimizer and EMA state, unsharded, to <run>/resumed_state.safetensors
    (the resume-matrix tests compare it with the checkpoint)."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    text: TextConfig = field(default_factory=TextConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "parallel.attention": STRATEGIES,
    "parallel.layout": ("contiguous", "zigzag"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "data.dataset": ("synthetic", "synthetic_i2v", "folder", "precomputed"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.image_noise": ("step", "clip"),
    "sample.sampler": ("ddim", "dpmpp_2m"),
    "model.pos_embedding": ("sincos", "rope"),
    "text.encoder": ("hashed", "t5"),
    "debug.fail_save": ("crash", "io_error"),
    "first_stage.kind": ("pixel", "vae"),
    "first_stage.preset": ("tiny", "cogvideox"),
    "first_stage.semantics": ("clip", "diffusers"),
}


def _all_keys(cls: type = JobConfig, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        key = prefix + f.name
        out.append(key)
        ftype = cls.__dataclass_fields__[f.name].default_factory if f.default_factory is not None else None
        if ftype is not None and is_dataclass(ftype):
            out.extend(_all_keys(ftype, key + "."))
    return out


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "not in" in msg:  # omegaconf: "Key 'x' not in 'ParallelConfig'"
        close = difflib.get_close_matches(key, _all_keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    return ConfigError(f"{source}: bad value for '{key}': {msg}")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def load_config(*yaml_paths: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Defaults <- each YAML (left to right) <- `key=value` overrides, validated."""
    cfg = OmegaConf.structured(JobConfig)
    for path in yaml_paths:
        path = Path(path)
        if not path.is_file():
            named = CONFIG_DIR / path
            if named.is_file():
                path = named
            else:
                raise ConfigError(f"config file {str(path)!r} does not exist (also looked in {CONFIG_DIR})")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections (model:, parallel:, train:, ...), "
                f"not a {type(loaded).__name__.replace('Config', '').lower()}"
            )
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. parallel.cp_size=2)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    job: JobConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(job)
    return job


def validate(job: JobConfig) -> None:
    """Checks of single values and of combinations that need no world size."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(job, section), name)
        if value is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    p = job.parallel
    if job.train.compile and p.model_parallel_size > 1:
        raise ConfigError(
            f"train.compile=true with parallel.model_parallel_size={p.model_parallel_size}: torch 2.13's compiler "
            "(AOT autograd) rejects the aliased DTensor outputs of tensor-parallel blocks; set "
            "parallel.model_parallel_size=1 (context and data parallelism compile) or train.compile=false"
        )
    try:
        validate_degrees(p.cp_size, p.model_parallel_size, p.ulysses_size)
    except TopologyError as err:
        raise ConfigError(f"parallel: {err}") from None
    if p.dp_replicate < 1:
        raise ConfigError(f"parallel.dp_replicate={p.dp_replicate} must be >= 1")
    positive = {
        "dist.timeout_s": job.dist.timeout_s,
        "dist.nproc_per_node": job.dist.nproc_per_node,
        "data.num_frames": job.data.num_frames,
        "data.height": job.data.height,
        "data.width": job.data.width,
        "data.batch_size": job.data.batch_size,
        "data.fps": job.data.fps,
        "train.steps": job.train.steps,
        "train.grad_accum": job.train.grad_accum,
        "train.log_every": job.train.log_every,
        "optim.lr": job.optim.lr,
        "optim.eps": job.optim.eps,
        "checkpoint.keep_last": job.checkpoint.keep_last,
        "sample.num_steps": job.sample.num_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if job.text.encoder == "t5" and not job.text.path:
        raise ConfigError("text.encoder='t5' needs text.path (a local T5 directory with config.json and tokenizer)")
    f = job.first_stage
    if f.semantics == "diffusers" and (f.cp_size != 1 and job.parallel.cp_size > 1 or f.chunk_latents):
        raise ConfigError(
            f"first_stage.semantics=diffusers evaluates whole clips in diffusers' batches on one rank: set "
            f"first_stage.cp_size=1 (is {f.cp_size}) and first_stage.chunk_latents=0 (is {f.chunk_latents}), or use "
            "semantics=clip"
        )
    if job.data.latent_cache_dir and job.first_stage.kind != "vae":
        raise ConfigError("data.latent_cache_dir needs first_stage.kind=vae (pixel space has no latents to cache)")
    if job.data.dataset == "folder" and not job.data.path:
        raise ConfigError("data.dataset='folder' needs data.path (a directory with videos/ and labels/)")
    if job.data.dataset == "precomputed" and not job.data.path:
        raise ConfigError("data.dataset='precomputed' needs data.path (a directory written by cpdit-launch precompute)")
    if job.data.dataset == "precomputed" and job.data.latent_cache_dir:
        raise ConfigError(
            "data.latent_cache_dir with data.dataset='precomputed': the precomputed directory already holds every "
            "posterior; remove data.latent_cache_dir"
        )
    _validate_buckets(job)
    ranges = {  # key: (value, low, high, inclusive high)
        "train.ema_decay": (job.train.ema_decay, 0.0, 1.0, False),
        "train.ucg_rate": (job.train.ucg_rate, 0.0, 1.0, True),
        "train.image_dropout": (job.train.image_dropout, 0.0, 1.0, True),
        "optim.grad_clip": (job.optim.grad_clip, 0.0, float("inf"), True),
        "optim.weight_decay": (job.optim.weight_decay, 0.0, float("inf"), True),
        "optim.min_lr_ratio": (job.optim.min_lr_ratio, 0.0, 1.0, True),
        "optim.start_lr_ratio": (job.optim.start_lr_ratio, 0.0, 1.0, True),
        "sample.guidance_scale": (job.sample.guidance_scale, 0.0, float("inf"), True),
        "sample.image_sigma": (job.sample.image_sigma, 0.0, float("inf"), True),
    }
    for key, (value, low, high, closed) in ranges.items():
        if not (low <= value < high or (closed and value == high)):
            raise ConfigError(f"{key}={value} must be in [{low}, {high}{']' if closed else ')'}")
    at_least = {
        "optim.warmup_steps": (job.optim.warmup_steps, 0),
        "optim.decay_steps": (job.optim.decay_steps if job.optim.decay_steps is not None else 1, 1),
        "checkpoint.every": (job.checkpoint.every, 0),
        "sample.every": (job.sample.every, 0),
        "model.lora_rank": (job.model.lora_rank, 0),
        "train.max_bad_steps": (job.train.max_bad_steps, 1),
        "train.num_idx": (job.train.num_idx, 2),
        "train.text_max_length": (job.train.text_max_length, 1),
        "data.num_samples": (job.data.num_samples, 1),
        "precompute.shard_size": (job.precompute.shard_size, 1),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    if job.parallel.ring_head_chunks is not None and job.parallel.ring_head_chunks < 1:
        raise ConfigError(f"parallel.ring_head_chunks={job.parallel.ring_head_chunks} must be >= 1 (or null)")
    if job.dist.watchdog_factor <= 1 or job.dist.watchdog_min_s <= 0:
        raise ConfigError(
            f"dist.watchdog_factor={job.dist.watchdog_factor} must be > 1 and dist.watchdog_min_s="
            f"{job.dist.watchdog_min_s} > 0 (or dist.watchdog=false)"
        )
    if job.train.shift_scale <= 0:
        raise ConfigError(f"train.shift_scale={job.train.shift_scale} must be > 0 (1 = no SNR shift)")
    if len(job.optim.betas) != 2 or not all(0 <= b < 1 for b in job.optim.betas):
        raise ConfigError(f"optim.betas={job.optim.betas} must be two numbers in [0, 1)")


def to_yaml(job: JobConfig) -> str:
    """The resolved config, as written into the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(job))


def _validate_buckets(job: JobConfig) -> None:
    """data.buckets and the knobs that go with it (the per-bucket shape checks need the model: launch/preflight.py)."""
    d, p = job.data, job.parallel
    if d.token_budget < 0:
        raise ConfigError(f"data.token_budget={d.token_budget} must be >= 0 (0: data.batch_size clips per bucket)")
    if d.buckets is None:
        for key, value in (
            ("data.bucket_weights", d.bucket_weights),
            ("data.token_budget", d.token_budget or None),
            ("parallel.dynamic_cp", p.dynamic_cp or None),
            ("parallel.cp_per_bucket", p.cp_per_bucket),
        ):
            if value is not None:
                raise ConfigError(f"{key}={value} needs data.buckets (a list of [frames, height, width])")
        return
    from launch.job.buckets import parse_buckets

    try:
        buckets = parse_buckets(d.buckets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not buckets:
        raise ConfigError("data.buckets=[] lists no bucket; give at least one [frames, height, width] or null")
    if d.dataset == "precomputed":
        raise ConfigError(
            "data.buckets with data.dataset='precomputed': a precomputed directory holds clips of one shape "
            "(cpdit-launch precompute does not bucket yet); remove data.buckets or train on the fly"
        )
    if d.bucket_weights is not None:
        if d.dataset not in ("synthetic", "synthetic_i2v"):
            raise ConfigError(
                f"data.bucket_weights is for the synthetic datasets (a folder's clips go to the bucket they fit); "
                f"remove it for data.dataset={d.dataset!r}"
            )
        if len(d.bucket_weights) != len(buckets) or any(w < 0 for w in d.bucket_weights) or sum(d.bucket_weights) <= 0:
            raise ConfigError(
                f"data.bucket_weights={d.bucket_weights} must give one share >= 0 per bucket ({len(buckets)}), not "
                "all 0"
            )
    if p.cp_per_bucket is not None:
        if not p.dynamic_cp:
            raise ConfigError("parallel.cp_per_bucket needs parallel.dynamic_cp=true")
        if len(p.cp_per_bucket) != len(buckets):
            raise ConfigError(
                f"parallel.cp_per_bucket={p.cp_per_bucket} gives {len(p.cp_per_bucket)} degrees for the "
                f"{len(buckets)} data.buckets; give one per bucket, in order"
            )
    if p.dynamic_cp and p.cp_size == 1:
        raise ConfigError("parallel.dynamic_cp=true with parallel.cp_size=1: there is no cp group to split")
    if p.dynamic_cp_memory_gib is not None and p.dynamic_cp_memory_gib <= 0:
        raise ConfigError(f"parallel.dynamic_cp_memory_gib={p.dynamic_cp_memory_gib} must be > 0")
