# Job entry points behind `cpdit-launch train|sample`.
from __future__ import annotations

from launch.config import JobConfig
from launch.env import DistEnv


def train_entry(cfg: JobConfig, env: DistEnv) -> int:
    from launch.job.train import train

    return train(cfg, env)


def sample_entry(cfg: JobConfig, env: DistEnv) -> int:
    from launch.job.sample import sample_job

    return sample_job(cfg, env)
