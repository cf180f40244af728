# What the rest of the system needs to know about a model family, declared in one place per family
# (cpdit/models/<family>/__init__.py) and looked up through cpdit/models/registry.py. launch/ and parallel/ ask the
# spec; they never test a model's class.
from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

TP_STYLES = ("colwise", "rowwise", "shared_norm", "heads")
"""Values of a tensor-parallel plan. colwise: an nn.Linear split by output features (heads, feed-forward columns);
rowwise: split by input features, its output summed over tp; shared_norm: a LayerNorm applied to this rank's heads
whose affine parameters all heads share (their gradient is summed over tp); heads: a module with a `heads` seam
(cpdit/seams.py AllHeads) that slices head-indexed tensors to this rank's heads."""


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field docstrings (the string literal under each field), by field name."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        stmt.target.id: " ".join(nxt.value.value.split())
        for stmt, nxt in zip(body, body[1:], strict=False)
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
    }


@dataclass(frozen=True)
class JobKnob:
    """A `model:` knob of the job that one family takes: a field of its config, overridden when set."""

    name: str
    type: Any
    """The config field's type; the job's knob is it or None (the preset's value)."""
    doc: str


@dataclass(frozen=True)
class DiffusersFormat:
    """How a family's weights and config map to a diffusers model class (loading `model.pretrained`, exporting)."""

    class_name: str
    """The diffusers class, e.g. CogVideoXTransformer3DModel."""
    config_from: Callable[[dict], Any]
    """diffusers config.json dict -> the family's config."""
    config_to: Callable[[Any], dict]
    state_dict_from: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    state_dict_to: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ModelFamily:
    """One model family. Adding a family is a folder under cpdit/models/ and one ModelFamily in the registry."""

    name: str
    title: str
    """How messages name it (CogVideoX, factorized, Phenaki)."""
    config_class: type
    """A frozen dataclass; its fields are the architecture a checkpoint records."""
    model_class: type
    """nn.Module: forward(latents (B, T, C, H, W), text (B, L, D), timesteps, *, return_local=False); a `sequence` seam
    (cpdit/sequence.py) bound once per forward; a `blocks` ModuleList (activation checkpointing wraps its entries);
    `init_weights(seed, assign)` seeded per parameter name."""
    presets: Mapping[str, Any]
    """model.preset names -> configs."""
    tp_plan: Mapping[str, str]
    """Module name patterns (`*` matches one dotted component) -> a style of TP_STYLES. Patterns that match no module
    (LoRA adapters that are not attached, an absent cross-attention) are skipped."""
    job_knobs: tuple[str, ...] = ()
    """Fields of this family's config that the job's `model:` section takes, beside the shared ones (num_layers,
    num_attention_heads, attention_head_dim, patch_size, text_embed_dim, in_channels, out_channels); the job's
    typed config gets them from here (`knobs()`), with the config field's type and docstring."""
    frame_causal: Callable[[Any], bool] = lambda config: False
    """Frame-causal models train with a noise level per frame and sample frames in order."""
    lora: bool = False
    """cpdit/lora.py adapters on the attention projections of every block (`blocks.*.attn.to_{q,k,v,out}`)."""
    planned: bool = False
    """`cpdit-launch plan` simulates this family's step (parallel/memory_model.py models unbiased, non-causal
    attention over [text | frames])."""
    diffusers: DiffusersFormat | None = None
    """None: no diffusers counterpart (no `model.pretrained`, the export writes cpdit's safetensors only)."""

    def knobs(self) -> list[JobKnob]:
        """The job knobs, checked against the config dataclass: each is a documented field of it."""
        types, docs = typing.get_type_hints(self.config_class), field_docs(self.config_class)
        names = {f.name for f in fields(self.config_class)}
        for name in self.job_knobs:
            if name not in names or name not in docs:
                raise TypeError(
                    f"the {self.title} family's job knob {name!r} is not a documented field of "
                    f"{self.config_class.__name__}"
                )
        return [JobKnob(name, types[name], f"{self.title}: {docs[name]}") for name in self.job_knobs]

    def config(self, preset: str, overrides: Mapping[str, Any]):
        from cpdit.models.preset import from_preset

        return from_preset(dict(self.presets), "model", preset, dict(overrides))

    def build(self, config) -> torch.nn.Module:
        return self.model_class(config)
