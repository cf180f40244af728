# Rank-0 run outputs: metrics.jsonl (one JSON object per logged step), a tqdm progress bar, wandb (offline unless
# WANDB_MODE says otherwise; never a key in files we write) and the loss-curve PNG.
from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        use_wandb: bool,
        project: str,
        config_yaml: str,
        enabled: bool,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)
        if use_wandb:
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb
            import yaml

            self.wandb = wandb.init(
                project=project,
                dir=str(run_dir),
                name=run_dir.name,
                resume="allow",
                id=f"{run_dir.name}-{abs(hash(str(run_dir.resolve()))) % 10**8}",
                config=yaml.safe_load(config_yaml),
            )

    def event(self, **fields) -> None:
        """A non-step record (restart, resume, skipped step) in metrics.jsonl."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(fields) + "\n")

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        self.bar.set_postfix(
            loss=f"{scalars['loss']:.4f}",
            lr=f"{scalars['lr']:.2e}",
            s_step=f"{scalars.get('step_time', 0):.2f}",
            tok_s=f"{scalars.get('tokens_per_s', 0):.0f}",
            mem_mb=f"{scalars.get('mem_mb', 0):.0f}",
            refresh=False,
        )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log_videos(self, step: int, videos: list[tuple[Path, str]]) -> None:
        """Sample videos (mp4 path, prompt) to wandb at `step`, the prompt as caption."""
        if self.wandb is not None and videos:
            import wandb

            media = [wandb.Video(str(p), caption=prompt, format="mp4") for p, prompt in videos]
            self.wandb.log({"samples": media}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r and "step" in r]
    if not rows:
        return
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
    ]
    ax.plot(steps, smooth, lw=1.8, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("v-prediction loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
