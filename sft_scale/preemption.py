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

import torch

from sft_scale.errors import SftScaleError

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again later". The SLURM script requeues on it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptedBeforeFirstStep(SftScaleError):
    """Signalled before this attempt trained a step: nothing to checkpoint, exit for requeue."""

    exit_code = 75
    label = "preempted"


class Preemption:
    def __init__(self):
        self.received: list[str] = []
        self.pid = os.getpid()
        self.stepped = False  # set by the loop once this attempt finished a step

    def install(self) -> "Preemption":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if not self.stepped and os.getpid() == self.pid:  # not in forked DataLoader workers
            raise PreemptedBeforeFirstStep(
                f"{name} received before the first step of this attempt finished: nothing new "
                "to checkpoint; stopped at once (any previous checkpoint is intact). Rerun the "
                "same command to resume.")
        if len(self.received) == 1:
            log.warning("%s received: finishing this step, then checkpoint and exit", name)
        else:
            log.warning("%s received again: already stopping; the checkpoint is being written", name)

    def requested(self, accelerator) -> bool:
        """True on every rank once any rank was signalled (a collective: call on all ranks)."""
        self.stepped = True
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0
