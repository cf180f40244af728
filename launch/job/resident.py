# Sampling a model trained from precomputed data (data.dataset=precomputed): training holds neither the VAE nor a
# frozen T5 in memory, but sampling decodes latents, encodes an image-to-video model's images and embeds the
# prompts. Both are built for the duration of the sampling (the VAE on the cp group as training would have it) and
# dropped after it, so validation costs their memory only while it runs.
from __future__ import annotations

import gc
from contextlib import contextmanager

import torch


@contextmanager
def sampling_stages(cfg, modules, par, device: torch.device):
    """Within it `par.first_stage` encodes and decodes, and `modules.encode` embeds captions with the frozen T5."""
    if cfg.data.dataset != "precomputed":
        yield
        return
    from launch.job.build import build_first_stage, build_frozen_text
    from parallel.parallelize import parallelize_first_stage

    posterior, frozen = par.first_stage, modules.frozen_text
    par.first_stage = parallelize_first_stage(
        build_first_stage(cfg, device), par.dims, par.mesh, cfg.first_stage.cp_size
    )
    modules.__dict__["frozen_text"] = build_frozen_text(cfg, device, modules.dit.config.text_embed_dim)
    try:
        yield
    finally:
        par.first_stage, modules.__dict__["frozen_text"] = posterior, frozen
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
