"""Errors a user can act on, each carrying its exit code, and the one wrapper that turns them into
a single line on stderr for `train.py` and `cli.py` alike.

Exit codes (README, "Exit codes"): 0 done, 2 bad config or data (nothing written), 3 a write
failed (checkpoint, adapter, model: the previous checkpoint is intact), 4 merge/export could not
produce a verified output, 5 the cluster refused or could not be reached, 6 the loss became
NaN/inf (the last good checkpoint is kept), 75 preempted (requeue).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class SftScaleError(Exception):
    """Base class: a problem with a clear message and a documented exit code."""

    exit_code = 1
    label = "error"


class ConfigError(SftScaleError, ValueError):
    """A config problem a user can fix; the message says where and how."""

    exit_code = 2
    label = "config error"


class DataError(SftScaleError, ValueError):
    """Bad training data; the message names the file, the line or record, and the fix."""

    exit_code = 2
    label = "data error"


class CheckpointError(SftScaleError, RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""

    exit_code = 3
    label = "checkpoint error"


class OutputWriteError(SftScaleError, RuntimeError):
    """Writing a run's outputs (adapter, model, records) failed: full disk, read-only folder."""

    exit_code = 3
    label = "write error"


class MergeError(SftScaleError, RuntimeError):
    """Merging or exporting could not produce a verified output; nothing was written."""

    exit_code = 4
    label = "merge error"


class DivergedError(SftScaleError, RuntimeError):
    """The training loss became NaN or infinite; nothing after the last checkpoint was kept."""

    exit_code = 6
    label = "training diverged"


class ClusterError(SftScaleError, RuntimeError):
    """The cluster (sbatch, scontrol, the SLURM controller) refused or could not be reached."""

    exit_code = 5
    label = "cluster error"


def run_reporting_errors(fn: Callable[[], int]) -> int:
    """Run `fn`; a known error becomes one line on stderr and its exit code."""
    try:
        return fn()
    except SftScaleError as e:
        print(f"{e.label}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
