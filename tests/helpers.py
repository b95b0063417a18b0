"""Helpers the tests import: paths of the repository, the real training script run in fresh
processes, and readers of what a run wrote. Fixtures and hooks live in conftest.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "examples" / "demo.yaml"
TRAIN = ROOT / "sft_scale" / "train.py"


def run_train(out_dir: Path, *sets: str, nproc: int = 1, extra_launch: list[str] | None = None,
              config: Path = DEMO_CONFIG, timeout: int = 600, check: bool = True):
    """Run the recipe as users do: `python train.py` (1 process) or `accelerate launch`."""
    args = ["--config", str(config), "--output-dir", str(out_dir)]
    for s in sets:
        args += ["--set", s]
    if nproc == 1 and not extra_launch:
        cmd = [sys.executable, str(TRAIN)] + args
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc)]
        cmd += (extra_launch or ["--multi_gpu"]) + ["--main_process_port", str(free_port()),
                                                    str(TRAIN)] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def train_metrics(out: Path) -> list[dict]:
    """The per-step training records of metrics.jsonl (eval records have eval_loss instead)."""
    return [m for m in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in m]


def losses(out: Path) -> list[float]:
    """The training losses of a run, step by step."""
    return [m["loss"] for m in train_metrics(out)]


def adapter(out: Path) -> dict:
    """The saved adapter's tensors."""
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def ds_launch(stage: str) -> list[str]:
    """`accelerate launch` flags for DeepSpeed with ds_configs/STAGE.json."""
    return ["--use_deepspeed", "--deepspeed_config_file",
            str(ROOT / "ds_configs" / f"{stage}.json")]


def section_config(section: str, **values):
    """A default Config with a placeholder dataset and the given fields of one section set, for
    unit tests that resolve switches or build a model without reading data."""
    from sft_scale.config import Config, DatasetSource

    cfg = Config()
    cfg.data.datasets = [DatasetSource(path="x.jsonl")]
    for k, v in values.items():
        setattr(getattr(cfg, section), k, v)
    return cfg


def lora_for_gradient_checks(model):
    """`model` wrapped with sft_scale's fused LoRA (no dropout: two runs would draw different
    masks) and every lora_B drawn at random (seed 1): B starts at zero, which would hide an
    error in the adapters' gradients."""
    import torch

    from sft_scale.training import lora_kernel
    from sft_scale.training.model import wrap_lora

    cfg = section_config("lora", dropout=0.0)
    model = wrap_lora(model, cfg, kernel=lora_kernel.FUSED)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model
