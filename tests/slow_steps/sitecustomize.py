"""Test-only: every training step of every process takes $SFT_SCALE_TEST_STEP_SLEEP seconds
longer, so that a signal, a kill or a scancel lands mid-run in the end-to-end tests.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one; the
tests put this folder on PYTHONPATH (`tests.slow_steps.env`), which every process of a run
inherits (accelerate's launcher, torchrun's workers, SLURM's srun). Production code has no such
hook: this wraps `sft_scale.training.loop.train_loop` as it is imported, adding a sleep after
each step.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import time

DELAY = float(os.environ.get("SFT_SCALE_TEST_STEP_SLEEP", "0") or 0)


def _slow_down(loop) -> None:
    real_loop, base = loop.train_loop, loop.StepHooks

    class Slowed(base):
        def __init__(self, hooks):
            self.hooks = hooks or base()

        def after_step(self, state) -> bool:
            time.sleep(DELAY)
            return self.hooks.after_step(state)

    def train_loop(training, batches, cfg, metrics, state=None, hooks=None):
        return real_loop(training, batches, cfg, metrics, state, Slowed(hooks))

    loop.train_loop = train_loop


class _PatchLoop(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sft_scale.training.loop":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _slow_down(module)

        spec.loader.exec_module = exec_module
        return spec


if DELAY > 0:
    sys.meta_path.insert(0, _PatchLoop())
