# The seed source documents (../shared/seeds, beside the project checkout) turned into runnable modules at test
# time, so that cpdit's factorized and Phenaki families can be compared with the code they come from. Nothing of
# the seeds is copied into the project: the text is read, repaired where the capture tool garbled it, and exec'd.
#
# Repairs, each where the seeds' README says the upstream repositories are the authority:
# - sgm: methods indented one level too deep (they would become functions nested in __init__) are dedented; the
#   relative imports are replaced by the few helpers of sgm's diffusionmodules/util.py that the code uses
#   (checkpoint without recomputation, linear, timestep_embedding, AlphaBlender), written here from sgm's behaviour.
# - phenaki-pytorch: the cut class header and forward signature of `Attention` are restored, with the cut
#   `kv_input = default(context, x)` line before `x = self.norm(x)` (both upstream versions have it); a missing
#   parenthesis in ContinuousPositionBias is closed; the helpers the excerpt does not include (exists, default,
#   l2norm, the bias-free LayerNorm, GEGLU feed-forward, PEG) are written here from phenaki-pytorch's behaviour.
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import typing
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"


def seed_file(name: str) -> Path:
    """A seed document's path. Missing, the test skips on a developer's machine and fails under CI (the variable
    CI set, as .ci/run and CI services do): there a missing checkout of shared/ must not pass as green."""
    path = SEEDS / name
    if not path.is_file():
        why = f"the seed sources are not at {SEEDS} (they sit beside the project checkout)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI is set, so the tests that load them fail instead of skipping", pytrace=False)
        pytest.skip(why)
    return path


def _text(name: str) -> str:
    text = seed_file(name).read_text()
    return text[text.index("```py") + len("```py") : text.rindex("```")]


def _dedent_deep_methods(code: str) -> str:
    """A `def` indented 8 spaces right after a 4-space comment line is a method captured one level too deep:
    dedent it and its body by 4."""
    lines, out, deep = code.split("\n"), [], False
    for i, line in enumerate(lines):
        prev = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if re.match(r" {8}def ", line) and re.match(r" {4}#", prev):
            deep = True
        elif deep and line.strip() and not line.startswith(" " * 8):
            deep = False
        out.append(line[4:] if deep and line.startswith("    ") else line)
    return "\n".join(out)


# --- sgm's diffusionmodules/util.py helpers (behaviour of generative-models) -----------------------------------


def _checkpoint(func, inputs, params, flag):
    return func(*inputs)  # the seeds run with checkpointing off


def _timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False, dtype=torch.float32):
    """sgm's sinusoidal embedding [cos | sin]. sgm computes it in float32; here it is computed in `dtype` when that is
    float64, so that a float64 comparison measures the modules, not float32 rounding."""
    half = dim // 2
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=work) / half).to(timesteps.device)
    args = timesteps[:, None].to(work) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(dtype)


class _AlphaBlender(nn.Module):
    def __init__(self, alpha: float, merge_strategy: str = "learned_with_images", rearrange_pattern="b t -> (b t) 1 1"):
        super().__init__()
        self.merge_strategy, self.rearrange_pattern = merge_strategy, rearrange_pattern
        if merge_strategy == "fixed":
            self.register_buffer("mix_factor", torch.Tensor([alpha]))
        else:
            self.register_parameter("mix_factor", nn.Parameter(torch.Tensor([alpha])))

    def get_alpha(self, image_only_indicator):
        import einops

        if self.merge_strategy == "fixed":
            return self.mix_factor.to(image_only_indicator.device if image_only_indicator is not None else "cpu")
        if self.merge_strategy == "learned":
            return torch.sigmoid(self.mix_factor)
        assert image_only_indicator is not None, "need image_only_indicator"
        alpha = torch.where(
            image_only_indicator.bool(),
            torch.ones(1, 1, device=image_only_indicator.device),
            torch.sigmoid(self.mix_factor)[..., None],
        )
        return einops.rearrange(alpha, self.rearrange_pattern)

    def forward(self, x_spatial, x_temporal, image_only_indicator=None):
        alpha = self.get_alpha(image_only_indicator)
        return alpha.to(x_spatial.dtype) * x_spatial + (1.0 - alpha).to(x_spatial.dtype) * x_temporal


def sgm_namespace() -> dict:
    """sgm's attention.py and video_attention.py, exec'd: CrossAttention, BasicTransformerBlock,
    SpatialTransformer, VideoTransformerBlock, SpatialVideoTransformer."""
    import einops
    import packaging.version

    ns: dict = {
        "__name__": "sgm_seed",
        "math": math,
        "torch": torch,
        "nn": nn,
        "F": F,
        "Any": typing.Any,
        "Optional": typing.Optional,
        "rearrange": einops.rearrange,
        "repeat": einops.repeat,
        "version": packaging.version,
        "isfunction": __import__("inspect").isfunction,
        "SDP_IS_AVAILABLE": True,
        "XFORMERS_IS_AVAILABLE": False,
        "BACKEND_MAP": {None: {}},
        "sdp_kernel": lambda **kw: contextlib.nullcontext(),
        "SDPBackend": type("SDPBackend", (), {}),
        "checkpoint": _checkpoint,
        "linear": nn.Linear,
        "timestep_embedding": _timestep_embedding,
        "AlphaBlender": _AlphaBlender,
    }
    attention = _text("001_e65850759413b9c4.txt")
    attention = attention[attention.index("def exists(val):") :]
    video = _dedent_deep_methods(_text("000_a37ebca6bd37c311.txt"))
    video = video[video.index("class TimeMixSequential") :]
    with contextlib.redirect_stdout(io.StringIO()):  # the seeds print on construction
        exec(compile(attention, str(SEEDS / "001_e65850759413b9c4.txt"), "exec"), ns)
        exec(compile(video, str(SEEDS / "000_a37ebca6bd37c311.txt"), "exec"), ns)
    return ns


# --- phenaki-pytorch attention.py (behaviour of lucidrains/phenaki-pytorch) ---------------------------------------


class _BiasFreeLayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class _GEGLU(nn.Module):
    def forward(self, x):
        value, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * value


def _feed_forward(dim, mult=4, dropout=0.0):
    inner = int(mult * (2 / 3) * dim)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        _GEGLU(),
        nn.Dropout(dropout),
        nn.Linear(inner, dim, bias=False),
    )


class _PEG(nn.Module):
    def __init__(self, dim, causal=False):
        super().__init__()
        self.causal = causal
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x, shape=None):
        orig = x.shape
        x = x.reshape(*shape, -1) if x.ndim == 3 else x  # (b, t, h, w, d)
        x = x.permute(0, 4, 1, 2, 3)
        x = F.pad(x, (1, 1, 1, 1, *((2, 0) if self.causal else (1, 1))))
        return self.dsconv(x).permute(0, 2, 3, 4, 1).reshape(orig)


def phenaki_namespace() -> dict:
    """phenaki-pytorch's Attention, AlibiPositionalBias, ContinuousPositionBias and Transformer, exec'd."""
    import einops

    code = _text("004_89ac4dad8cf3567a.txt")
    init = code.index("        def __init__(")
    body = code.index("    batch, device, dtype = x.shape[0]")
    rest = code.index("class AlibiPositionalBias")
    rest = code.rindex("\n", 0, rest)  # keep the comment line before it out of the method body
    header = "class Attention(nn.Module):\n"
    init_src = "\n".join(line[4:] for line in code[init:body].split("\n"))
    forward = "    def forward(self, x, mask=None, context=None, attn_bias=None):\n"
    body_src = "\n".join(("    " + line) if line.strip() else line for line in code[body:rest].split("\n"))
    cut = "        x = self.norm(x)"
    assert body_src.count(cut) == 1, "the seed's Attention.forward changed shape"
    body_src = body_src.replace(cut, "        kv_input = default(context, x)\n" + cut)
    tail = code[rest:].replace("self.net.append(nn.Linear(dim, heads)\n", "self.net.append(nn.Linear(dim, heads))\n")
    ns: dict = {
        "__name__": "phenaki_seed",
        "math": math,
        "torch": torch,
        "nn": nn,
        "F": F,
        "einsum": torch.einsum,
        "rearrange": einops.rearrange,
        "repeat": einops.repeat,
        "Tuple": tuple,
        "beartype": lambda f: f,
        "exists": lambda v: v is not None,
        "default": lambda v, d: v if v is not None else d,
        "l2norm": lambda t: F.normalize(t, dim=-1),
        "leaky_relu": lambda p=0.1: nn.LeakyReLU(p),
        "LayerNorm": _BiasFreeLayerNorm,
        "FeedForward": _feed_forward,
        "PEG": _PEG,
    }
    exec(compile(header + init_src + forward + body_src + tail, str(SEEDS / "004_89ac4dad8cf3567a.txt"), "exec"), ns)
    return ns
