"""metrics.jsonl (one JSON line per logged step), TensorBoard event files and wandb when asked
for; written by the main process only."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from sft_scale import optional

log = logging.getLogger(__name__)


def peak_memory_mb(device) -> float:
    """This process's memory high-water mark so far, in MiB: on a GPU what PyTorch allocated
    (torch.cuda.max_memory_allocated, what the planner estimates), on CPU the peak resident set
    (ru_maxrss, which includes the interpreter and libraries)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


class MetricsWriter:
    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None,
                 wandb_config: dict | None = None):
        self.path = path
        self.records: list[dict] = []
        self.tb = None
        self.wandb = None
        if tensorboard_dir is not None:
            self.tb = SummaryWriter(str(tensorboard_dir))
        if wandb_config is not None:
            if optional.is_available("wandb"):
                import wandb  # optional (sft_scale.optional)

                self.wandb = wandb.init(config=wandb_config, resume="allow")
            else:
                log.warning("logging.wandb is on but wandb is not installed; skipping it")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                is_eval = k.startswith("eval") or k in ("perplexity", "accuracy", "f1")
                self.tb.add_scalar(("eval/" if is_eval else "train/") + k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """loss.png: the training loss per step and the eval loss where it was measured."""
    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    fig = Figure(figsize=(7, 4))  # no pyplot: no GUI backend, no global figure to close
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
