# Job entry points behind `cpdit-launch train|sample`.
from __future__ import annotations

from launch.config import JobConfig
from launch.env import DistEnv


def train_entry(cfg: JobConfig, env: DistEnv) -> int:
    # The training loop (diffusion objective, data, checkpointing) is its own issue; until it lands,
    # `train` proves the launch path end to end with the distributed self-check.
    from launch.selfcheck import selfcheck

    return selfcheck(cfg, env)


def sample_entry(cfg: JobConfig, env: DistEnv) -> int:
    raise SystemExit("cpdit-launch sample: the sampling job is not implemented yet (see the main-job issue)")
