"""The run manifest: enough to know later what ran, where, with what, and how it ended."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

from accelerate.utils import gather_object

PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "bitsandbytes", "datasets",
            "safetensors", "tokenizers", "sft_scale")


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def attempt_record(accelerator, resumed_from: str | None) -> dict:
    """This attempt's facts (a collective: every rank must call it, for the host list)."""
    hosts = sorted(set(gather_object([socket.gethostname()])))
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ended_at": None,
            "ended": "running", "world_size": accelerator.num_processes, "hostnames": hosts,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
            "resumed_from": resumed_from}
