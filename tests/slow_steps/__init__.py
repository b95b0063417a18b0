"""Slow training steps for end-to-end tests that signal or kill a run mid-way (see
sitecustomize.py here); `env(seconds)` is the environment a run needs for it."""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def env(seconds: float, base: dict | None = None) -> dict:
    """`base` (default: this process's environment) with every training step `seconds` slower."""
    base = dict(os.environ if base is None else base)
    path = [str(HERE), str(ROOT)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(base, SFT_SCALE_TEST_STEP_SLEEP=str(seconds), PYTHONPATH=os.pathsep.join(path))
