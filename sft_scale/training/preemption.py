"""SIGTERM / SIGUSR1 -> finish the step, checkpoint, exit with PREEMPTED_EXIT_CODE.

The handler only sets a flag, so a second signal during the save changes nothing; the ranks agree
on stopping through an all-reduce, so they all save the same step even when only one was
signalled. Until the first step of this attempt has finished there is nothing new to save, and
that step may be the slow one (model loading, a compile, a huge batch): a signal then exits at
once with the same code, the previous checkpoint untouched.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again later". The SLURM script requeues on it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self):
        self.received: list[str] = []
        self.pid = os.getpid()
        self.immediate = True  # until the saves at the end: stop at once if no step was made
        self.state, self.start_step = None, None

    def track(self, state) -> None:
        """Watch the loop's state: once its step moved past `state.step` there is progress to
        save, and a signal waits for the end of the step."""
        self.state, self.start_step = state, state.step

    def _made_progress(self) -> bool:
        return self.state is not None and self.state.step != self.start_step

    def install(self) -> Preemption:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.immediate and not self._made_progress() and os.getpid() == self.pid:
            # (the pid check: forked DataLoader workers inherit this handler)
            # SystemExit, not an Exception: library code that catches broadly (model loading)
            # must not swallow it; `finally` blocks and atexit (the run lock) still run.
            print(f"preempted: {name} received before the first step of this attempt "
                  "finished: nothing new to checkpoint; stopped at once (any previous "
                  "checkpoint is intact). Rerun the same command to resume.", file=sys.stderr,
                  flush=True)
            raise SystemExit(PREEMPTED_EXIT_CODE)
        if len(self.received) == 1:
            log.warning("%s received: finishing this step, then checkpoint and exit", name)
        else:
            log.warning("%s received again: already stopping; the checkpoint is being written",
                        name)

    def requested(self, accelerator) -> bool:
        """True on every rank once any rank was signalled (a collective: call on all ranks)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0
