"""Preemption (training/preemption.py) with real signals, to this process, a forked child and a
fresh interpreter: at once with exit 75 before the first step of an attempt, at the end of the
step after it, never in a forked worker, and `requested` on a real single-process Accelerator."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sft_scale.config import load_config
from sft_scale.training.distributed import make_accelerator
from sft_scale.training.loop import LoopState
from sft_scale.training.preemption import PREEMPTED_EXIT_CODE, SIGNALS, Preemption
from tests.helpers import DEMO_CONFIG, ROOT


@pytest.fixture
def handlers():
    """Put this process's own signal handlers back after a test installed Preemption's."""
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def deliver(sig) -> None:
    """Send `sig` to this process and give Python the moment to run its handler."""
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # handlers run in the main thread between bytecodes: this sleep


def test_the_exit_code_is_ex_tempfail_which_the_slurm_script_requeues_on():
    assert PREEMPTED_EXIT_CODE == 75 == os.EX_TEMPFAIL
    assert set(SIGNALS) == {signal.SIGTERM, signal.SIGUSR1}


def test_a_signal_before_any_step_exits_75_at_once(handlers, capsys):
    p = Preemption().install()
    with pytest.raises(SystemExit) as e:
        deliver(signal.SIGUSR1)
    assert e.value.code == PREEMPTED_EXIT_CODE and p.received == ["SIGUSR1"]
    assert "preempted: SIGUSR1 received before the first step of this attempt finished" \
        in capsys.readouterr().err


def test_a_signal_while_the_first_step_of_a_resumed_attempt_runs_exits_at_once(handlers):
    p = Preemption().install()
    p.track(LoopState(step=40))  # resumed at step 40: nothing new until step 41
    with pytest.raises(SystemExit):
        deliver(signal.SIGTERM)


def test_after_progress_a_signal_waits_for_the_end_of_the_step(handlers, caplog):
    p = Preemption().install()
    state = LoopState(step=40)
    p.track(state)
    state.step = 41  # one step of this attempt finished: there is something to save
    with caplog.at_level(logging.WARNING, logger="sft_scale.training.preemption"):
        deliver(signal.SIGTERM)
        deliver(signal.SIGUSR1)  # a second signal during the save changes nothing
    assert p.received == ["SIGTERM", "SIGUSR1"]
    assert [r.getMessage() for r in caplog.records] == [
        "SIGTERM received: finishing this step, then checkpoint and exit",
        "SIGUSR1 received again: already stopping; the checkpoint is being written"]


def test_during_the_final_saves_a_signal_never_exits_at_once(handlers):
    p = Preemption().install()
    p.immediate = False  # what train.py sets after the loop, before the saves
    deliver(signal.SIGTERM)
    assert p.received == ["SIGTERM"]


def test_a_forked_dataloader_worker_records_the_signal_but_does_not_exit(handlers):
    p = Preemption().install()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a DataLoader worker inherits
        try:
            deliver(signal.SIGTERM)
            os.write(write, ",".join(p.received).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        got = f.read()
    assert os.waitstatus_to_exitcode(status) == 0 and got == "SIGTERM"
    assert p.received == []  # the parent got nothing


def test_a_fresh_process_exits_75_and_still_runs_its_finally_and_atexit(tmp_path):
    code = textwrap.dedent(f"""
        import atexit, pathlib, time
        from sft_scale.training.preemption import Preemption
        atexit.register(lambda: pathlib.Path({str(tmp_path / 'atexit')!r}).touch())
        Preemption().install()
        try:
            print("ready", flush=True)
            time.sleep(60)
        finally:
            pathlib.Path({str(tmp_path / 'finally')!r}).touch()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert err.startswith("preempted: SIGTERM received before the first step") and \
        "Rerun the same command to resume" in err and "Traceback" not in err
    assert (tmp_path / "finally").exists() and (tmp_path / "atexit").exists()


def test_requested_on_one_process_says_whether_a_signal_came(handlers):
    acc = make_accelerator(load_config(DEMO_CONFIG))
    p = Preemption().install()
    state = LoopState()
    p.track(state)
    state.step = 1
    assert p.requested(acc) is False
    deliver(signal.SIGTERM)
    assert p.requested(acc) is True and p.requested(acc) is True  # it stays requested
