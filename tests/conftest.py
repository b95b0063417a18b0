"""Shared fixtures: an isolated, offline cache for the builtin model and helpers that run the real
training script in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "examples" / "demo.yaml"
TRAIN = ROOT / "sft_scale" / "train.py"

# No network in tests: anything that tries to reach a hub fails loudly instead of hanging.
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session", autouse=True)
def sft_scale_home(tmp_path_factory):
    """One builtin tiny-llama per test session, built by the project itself (offline)."""
    home = os.environ.get("SFT_SCALE_TEST_HOME") or str(tmp_path_factory.mktemp("sft_scale_home"))
    os.environ["SFT_SCALE_HOME"] = home
    from sft_scale.model_source import resolve_model_path
    resolve_model_path("builtin:tiny-llama")
    return Path(home)


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
        cmd += (extra_launch or ["--multi_gpu"]) + ["--main_process_port", str(_free_port()),
                                                    str(TRAIN)] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def train_metrics(out: Path) -> list[dict]:
    """The per-step training records of metrics.jsonl (eval records have eval_loss instead)."""
    return [m for m in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in m]


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """`family_model(name) -> Path`: a saved tiny model of a real family (tests/families.py),
    built once per test session and shared by every test that asks for it."""
    from tests.families import build_family

    root = tmp_path_factory.mktemp("families")
    return lambda name: build_family(name, root)


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

