"""Real SLURM: a two-node cluster (slurmctld + two slurmd + munge) on this host, started here."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DEMO_CONFIG, ROOT, read_jsonl
from tests.slurm_cluster import LocalSlurm, available

pytestmark = pytest.mark.slow

SETS = ["training.max_steps=10", "training.micro_batch_size=4", "training.logging_steps=1",
        "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = available()
    if why:
        pytest.skip(why)  # .ci/run installs slurm-wlm and munge, so CI always runs these
    c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, out, *extra, env=None):
    cmd = [sys.executable, "-m", "sft_scale.cli", "slurm", "submit", "--config", str(DEMO_CONFIG),
           "--output-dir", str(out), *extra] + [x for s in SETS for x in ("--set", s)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(cluster.env, **(env or {})))


def job_id(out) -> str:
    return read_jsonl(out / "slurm" / "jobs.jsonl")[-1]["job_id"]


def job(cluster, jid) -> dict:
    res = cluster.run("scontrol", "show", "job", "-o", jid)
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def wait_state(cluster, jid, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600,
               while_waiting=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = job(cluster, jid)
        if info.get("JobState") in states:
            return info
        if while_waiting:
            while_waiting(info)
        time.sleep(1)
    raise AssertionError(f"job {jid} still {job(cluster, jid).get('JobState')} after {timeout}s")


def log_of(out, jid) -> str:
    return (out / "slurm" / f"sft-scale-{jid}.log").read_text()


def test_one_node_job_trains_the_demo(cluster, tmp_path):
    out = tmp_path / "one"
    res = submit(cluster, out, "--nodes", "1", "--partition", "debug", "--time", "00:20:00")
    assert res.returncode == 0, res.stderr[-3000:]
    jid = job_id(out)
    assert f"submitted job {jid}" in res.stdout
    info = wait_state(cluster, jid)
    log = log_of(out, jid)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "attempt 1 ended: exit 0, run status 'completed'" in log
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert list((out / "slurm").glob("job-*.sbatch")) and list((out / "slurm").glob("node-*.sh"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attempts"][-1]["slurm_job_id"] == jid


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    res = submit(cluster, out, "--nodes", "2", "--zero", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    info = wait_state(cluster, job_id(out))
    assert info["JobState"] == "COMPLETED", log_of(out, job_id(out))[-3000:]
    return out


def test_two_node_zero2_job_has_world_size_two(two_node_run):
    log = log_of(two_node_run, job_id(two_node_run))
    assert "distributed: DEEPSPEED, world size 2" in log
    assert "rendezvous at n1:" in log
    summary = json.loads((two_node_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    assert sorted(json.loads((two_node_run / "manifest.json").read_text())
                  ["attempts"][-1]["hostnames"])  # recorded


def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_run(cluster, two_node_run,
                                                                          tmp_path):
    out = tmp_path / "pre"
    res = submit(cluster, out, "--nodes", "2", "--zero", "2", "--max-requeues", "2",
                 env={"SFT_SCALE_DEBUG_STEP_SLEEP": "0.5"})  # slow steps, to signal mid-run
    assert res.returncode == 0, res.stderr[-3000:]
    jid = job_id(out)
    t0 = time.time()
    while not ((out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= 3):
        assert time.time() - t0 < 300, "training did not start"
        time.sleep(0.2)
    # What Slurm does --signal seconds before the time limit, sent now.
    cluster.run("scancel", "--signal=USR1", jid)

    pending_since = []

    def hurry(info):
        # Slurm holds a requeued job for a while before it is eligible again; skip most of the
        # wait, but only once the old allocation is fully released (both nodes idle, a few
        # seconds on): starting at once races the revocation of the old job credential.
        if info.get("JobState") != "PENDING" or info.get("Restarts") != "1":
            return
        pending_since.append(time.time())
        nodes = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
        if time.time() - pending_since[0] > 5 and nodes and all(n == "idle" for n in nodes):
            cluster.run("scontrol", "update", f"JobId={jid}", "StartTime=now", check=False)

    info = wait_state(cluster, jid, while_waiting=hurry)
    log = log_of(out, jid)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "run status 'preempted'" in log and "requeueing (requeue 1 of at most 2)" in log
    assert "resumed from" in log
    attempts = json.loads((out / "manifest.json").read_text())["attempts"]
    assert attempts[0]["ended"].startswith("preempted") and attempts[1]["ended"] == "completed"
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two_node_run / "adapter" / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bad_submissions_fail_clearly_and_leave_nothing(cluster, tmp_path):
    out = tmp_path / "bad"
    res = submit(cluster, out, "--partition", "gpu-huge")
    assert res.returncode == 2
    assert "unknown SLURM partition 'gpu-huge'; this cluster has: debug" in res.stderr
    assert not out.exists()
    cmd = [sys.executable, "-m", "sft_scale.cli", "slurm", "submit", "--config",
           str(tmp_path / "missing.yaml"), "--output-dir", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=cluster.env)
    assert res.returncode == 2 and "missing.yaml: config file not found" in res.stderr
    assert not out.exists()
    # sbatch itself refusing (an impossible request) also leaves nothing behind
    res = submit(cluster, out, "--time", "not-a-time")
    assert res.returncode == 5 and "cluster error: sbatch refused the job" in res.stderr
    assert not out.exists()


def test_status_logs_cancel(cluster, tmp_path):
    out = tmp_path / "conv"
    res = submit(cluster, out, env={"SFT_SCALE_DEBUG_STEP_SLEEP": "1"})
    assert res.returncode == 0, res.stderr
    cli = [sys.executable, "-m", "sft_scale.cli", "slurm"]
    st = subprocess.run(cli + ["status", "--output-dir", str(out)], capture_output=True, text=True,
                        env=cluster.env, cwd=ROOT)
    assert json.loads(st.stdout)["job_id"] == job_id(out)
    res = subprocess.run(cli + ["cancel", "--output-dir", str(out)], capture_output=True,
                         text=True, env=cluster.env, cwd=ROOT)
    assert f"cancelled job {job_id(out)}" in res.stdout
    info = wait_state(cluster, job_id(out))
    assert info["JobState"] == "CANCELLED"
