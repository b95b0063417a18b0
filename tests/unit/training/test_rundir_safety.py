"""Outputs: file modes follow the umask, one run per output dir, writability checked up front,
merge/export never write over their inputs, write failures end as exit 3 with the manifest
saying so."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from sft_scale.errors import ConfigError, OutputWriteError
from sft_scale.tools.merge import check_output, check_shard_size
from sft_scale.training import rundir as outputs
from sft_scale.training.rundir import atomic_dir, atomic_write_json, atomic_write_text


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(p):
    return p.stat().st_mode & 0o777


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "m.json", {})
    with atomic_dir(tmp_path / "adapter") as d:
        (d / "w.safetensors").write_bytes(b"x")
        (d / "sub").mkdir()
        os.chmod(d / "w.safetensors", 0o600)  # as a library writing through tempfile does
    assert [mode(tmp_path / n) for n in ("a.txt", "m.json")] == [0o644, 0o644]
    assert mode(tmp_path / "adapter") == 0o755 and mode(tmp_path / "adapter" / "sub") == 0o755
    assert mode(tmp_path / "adapter" / "w.safetensors") == 0o644
    umask(0o077)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert mode(tmp_path / "b.txt") == 0o600


def test_one_run_per_output_dir_and_stale_locks_are_taken_over(tmp_path):
    lock = outputs.acquire_run_lock(tmp_path)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                          rf"pid {os.getpid()}, started .*\.run\.lock"):
        outputs.acquire_run_lock(tmp_path)
    outputs.release_run_lock(lock)
    assert not lock.exists()
    # a lock left by a process that died (SIGKILL: no cleanup) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead)}))
    assert json.loads(outputs.acquire_run_lock(tmp_path).read_text())["pid"] == os.getpid()
    outputs.release_run_lock(lock)
    # another host's processes cannot be checked from here: refused
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started_at": "then"}))
    with pytest.raises(ConfigError, match="host elsewhere, pid 1, started then"):
        outputs.acquire_run_lock(tmp_path)
    # ... unless it is this SLURM job's own earlier attempt (requeued on another node)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": "77"}))
    os.environ["SLURM_JOB_ID"] = "77"
    try:
        assert json.loads(outputs.acquire_run_lock(tmp_path).read_text())["pid"] == os.getpid()
    finally:
        del os.environ["SLURM_JOB_ID"]


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("")
    with pytest.raises(ConfigError, match="exists and is a file"):
        outputs.check_writable(f)
    outputs.check_writable(tmp_path / "new" / "deeper")  # creatable: fine
    assert not (tmp_path / "new").exists()  # and nothing was written


def test_a_read_only_output_dir_is_refused_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs mount (root): permissions alone do not stop root")
    try:
        with pytest.raises(ConfigError, match="cannot create files in .*Read-only"):
            outputs.check_writable(ro / "run")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.fixture
def run_tree(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_text("")
    return run, base


@pytest.mark.parametrize("out,relation", [("base", "is the base model"),
                                          ("run", "contains the adapter"),
                                          ("run/adapter", "is the adapter"),
                                          ("run/merged", "lies inside the training run"),
                                          ("base/sub", "lies inside the base model"),
                                          (".", "contains the adapter")])
def test_merge_and_export_refuse_an_out_that_overlaps_an_input(run_tree, out, relation):
    run, base = run_tree
    target = run.parent / out
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=relation + ".*--overwrite does not change this"):
            check_output(target, overwrite, {"adapter": run / "adapter", "base model": base,
                                             "training run": run})
    assert (base / "model.safetensors").exists() and (run / "adapter").exists()


def test_merge_out_that_is_a_file_and_bad_shard_sizes_are_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(ConfigError, match="is an existing file"):
        check_output(f, True, {})
    for bad in ("abc", "0", "-5GB"):
        with pytest.raises(ConfigError, match="expected a size such as 5GB"):
            check_shard_size(bad)
    check_shard_size("500MB")


def test_a_failing_write_is_exit_3_and_recorded_in_the_manifest(tmp_path):
    from safetensors import SafetensorError

    from sft_scale.train import _write_guard

    outputs.update_manifest(tmp_path, status="running", attempts=[{"ended": "running"}])
    attempt = {"ended": "running"}
    guard = _write_guard(outputs, tmp_path, attempt, main_proc=True)

    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    def safetensors_full(*_a):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    for fail in (full, safetensors_full):
        with pytest.raises(OutputWriteError,
                           match="could not write the final adapter in .*No "
                                 r"space left.*last good checkpoint \(none\)") as e:
            guard("final adapter", fail)
        assert e.value.exit_code == 3
        m = outputs.read_manifest(tmp_path)
        assert m["status"] == "failed" and "No space left" in m["attempts"][-1]["ended"]
    assert guard("x", lambda a: a + 1, 1) == 2
