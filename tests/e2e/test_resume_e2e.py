"""Checkpoints, exact resume after real kills, and preemption by real signals."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests import slow_steps
from tests.helpers import (
    DEMO_CONFIG,
    ROOT,
    TRAIN,
    adapter,
    free_port,
    losses,
    run_train,
    train_metrics,
)

pytestmark = pytest.mark.slow

# Dropout on, so the resumed RNG state matters; a checkpoint every 2 steps.
SETS = ("training.max_steps=8", "training.micro_batch_size=4", "training.logging_steps=1",
        "lora.dropout=0.1", "checkpoint.every_steps=2", "checkpoint.keep_last=2")


def command(out, nproc=1, stage=None):
    args = ["--config", str(DEMO_CONFIG), "--output-dir", str(out)]
    for s in SETS:
        args += ["--set", s]
    if nproc == 1:
        return [sys.executable, str(TRAIN)] + args
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
            "--use_deepspeed", "--deepspeed_config_file",
            str(ROOT / "ds_configs" / f"{stage}.json"),
            "--main_process_port", str(free_port()), str(TRAIN)] + args


def start(out, nproc=1, stage=None):
    env = slow_steps.env(0.4)  # slow steps so we can hit one
    return subprocess.Popen(command(out, nproc, stage), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, ("training ended before the event we wait for:\n"
                                     + proc.stdout.read()[-3000:])
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def finish(out, nproc=1, stage=None):
    proc = subprocess.run(command(out, nproc, stage), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def kill_after_checkpoint(out, step, nproc=1, stage=None):
    proc = start(out, nproc, stage)
    wait_for(lambda: (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    finish(out)
    return out


def test_checkpoints_are_complete_pruned_and_manifest_written(reference):
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000008"]  # keep_last=2
    state = json.loads((reference / "checkpoints" / "step-00000008" / "trainer_state.json")
                       .read_text())
    assert state["step"] == 8 and state["identity"]["world_size"] == 1
    assert state["reason"] == "final" and len(state["losses"]) == 8
    m = json.loads((reference / "manifest.json").read_text())
    assert m["status"] == "completed" and m["packages"]["torch"] and m["deepspeed_config"] is None
    assert m["attempts"][-1]["ended"] == "completed" and m["attempts"][-1]["hostnames"]
    assert m["config"]["training"]["max_steps"] == 8


def test_sigkill_then_resume_is_bit_exact(reference, tmp_path):
    out = tmp_path / "killed"
    kill_after_checkpoint(out, 4)
    assert not (out / "adapter").exists()
    proc = finish(out)
    assert "resumed from" in proc.stderr
    assert losses(out) == losses(reference)  # bit-exact, every step
    a, b = adapter(out), adapter(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["attempts"]) == 2 and m["attempts"][0]["ended"] == "running"  # killed: never ended
    assert m["attempts"][1]["resumed_from"].endswith("step-00000004")


def test_sigterm_at_a_random_step_checkpoints_exits_75_and_resumes_exactly(reference, tmp_path):
    out = tmp_path / "preempted"
    proc = start(out)
    k = random.Random().randint(1, 6)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(train_metrics(out)) >= k, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGUSR1)  # a second signal during the save changes nothing
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, log[-3000:]
    assert "preempted: checkpoint at step" in log
    newest = sorted((out / "checkpoints").iterdir())[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["reason"] == "preempted" and state["step"] >= k
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "preempted" and "SIGTERM" in m["attempts"][-1]["ended"]
    finish(out)
    assert losses(out) == losses(reference)
    a, b = adapter(out), adapter(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(reference, tmp_path):
    out = tmp_path / "corrupt"
    kill_after_checkpoint(out, 6)
    newest = out / "checkpoints" / "step-00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated by a dying disk
    (out / "checkpoints" / ".tmp-step-00000008").mkdir()  # a half-written one, no marker
    proc = finish(out)
    assert "skipping checkpoint" in proc.stderr and "truncated" in proc.stderr
    assert "resumed from " + str(out / "checkpoints" / "step-00000004") in proc.stderr
    assert losses(out) == losses(reference)


def test_incompatible_checkpoint_is_refused(reference, tmp_path):
    out = tmp_path / "other"
    kill_after_checkpoint(out, 2)
    proc = run_train(out, *SETS, "lora.r=4", check=False)
    assert proc.returncode == 2
    assert "checkpoint was trained with LoRA shape" in proc.stderr


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_process_kill_and_resume(tmp_path, stage):
    ref = tmp_path / "ref"
    finish(ref, 2, stage)
    out = tmp_path / "killed"
    kill_after_checkpoint(out, 4, 2, stage)
    proc = finish(out, 2, stage)
    assert "resumed from" in proc.stderr + proc.stdout
    # Same arithmetic, same order: identical here; the stated tolerance allows for reduction order.
    assert losses(out) == pytest.approx(losses(ref), rel=1e-5, abs=1e-6)
    a, b = adapter(out), adapter(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: the output dir on a 1.2 MB tmpfs (needs root to mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the writer-that-raises unit test "
                    "covers this")
    try:
        out = mnt / "run"
        proc = run_train(out, *SETS, "checkpoint.keep_last=5", check=False)
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert "checkpoint error: could not write the checkpoint for step" in proc.stderr
        assert "the disk is full" in proc.stderr or "No space left on device" in proc.stderr
        done = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert done and not [d for d in done if d.startswith(".tmp")]
        from sft_scale.training.checkpoint import verify
        assert all(verify(out / "checkpoints" / d) is None for d in done)
    finally:
        subprocess.run(["umount", str(mnt)])
