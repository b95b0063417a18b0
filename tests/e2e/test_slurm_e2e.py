"""Real SLURM: a two-node cluster (slurmctld + two slurmd + munge) on this host, started here,
with cgroup process tracking and core binding where the host allows it (tests/slurm_cluster.py).
The last test needs no cluster: it sends TERM to every process of a real node script, as Slurm
does under proctrack/linuxproc, where the launcher gets TERM too."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft_scale.preflight.slurm import SlurmOptions, render
from sft_scale.training.checkpoint import list_checkpoints, verify
from tests import slow_steps
from tests.helpers import DEMO_CONFIG, ROOT, free_port, read_jsonl
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


def submit(cluster, out, *extra, env=None, python=sys.executable):
    """Each test node has the host's 2 CPUs; two-node jobs share them, so their processes keep
    one thread each. The job's Python is this one unless a test passes python=None."""
    one_thread = ["--setup", "export OMP_NUM_THREADS=1"] if "--nodes" in extra and \
        extra[extra.index("--nodes") + 1] != "1" else []
    cmd = [sys.executable, "-m", "sft_scale.cli", "slurm", "submit", "--config", str(DEMO_CONFIG),
           "--output-dir", str(out), "--cpus-per-task", "2", *(["--python", python] if python
                                                               else []), *one_thread, *extra] \
        + [x for s in SETS for x in ("--set", s)]
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
    # Two nodes' progress bars interleave in one file (srun --label splits at newlines, tqdm
    # redraws with \r), which can cut a multi-byte character.
    return (out / "slurm" / f"sft-scale-{jid}.log").read_text(errors="replace")


def test_one_node_job_trains_the_demo(cluster, tmp_path):
    """The job's own Python (found on PATH after the --setup lines), CPUs passed to the step."""
    out = tmp_path / "one"
    venv_bin = Path(sys.executable).parent
    res = submit(cluster, out, "--nodes", "1", "--partition", "debug", "--time", "00:20:00",
                 "--setup", f"export PATH={venv_bin}:$PATH", python=None)
    assert res.returncode == 0, res.stderr[-3000:]
    jid = job_id(out)
    assert f"submitted job {jid}" in res.stdout and "signal window: USR1 120 s" in res.stdout
    info = wait_state(cluster, jid)
    log = log_of(out, jid)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"[sft-scale] python {venv_bin / 'python'} (" in log  # the import check passed
    # Under cgroup core binding the step sees only the CPUs srun asked for (1 without
    # --cpus-per-task since Slurm 22.05).
    assert "0: [sft-scale] node 0 on " in log and "2 CPUs for 1 process(es), OMP_NUM_THREADS=2" \
        in log if cluster.cgroup else "OMP_NUM_THREADS=2" in log
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


def test_two_node_zero2_job_has_world_size_two(cluster, two_node_run):
    log = log_of(two_node_run, job_id(two_node_run))
    assert "distributed: DEEPSPEED, world size 2" in log
    assert "process-group timeout 30 min (distributed.timeout_minutes)" in log
    port = int(log.split("rendezvous at n1:")[1].split()[0])
    assert 20000 <= port < 32768  # below the ephemeral range
    assert "1: [sft-scale] node 1 on " in log  # srun --label
    if cluster.cgroup:  # each node's step is bound to the 2 CPUs srun asked for
        assert "2 CPUs for 1 process(es), OMP_NUM_THREADS=1" in log
    summary = json.loads((two_node_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    # Several nodes: the job tokenized once (`data prepare`, before training) and both ranks
    # loaded that, tokenizing nothing themselves.
    assert (two_node_run / "prepared_data" / "prepared.json").exists()
    for rank in (0, 1):
        assert f"data: rank {rank} loads the prepared data from" in log
    assert sorted(json.loads((two_node_run / "manifest.json").read_text())
                  ["attempts"][-1]["hostnames"])  # recorded


def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_run(cluster, two_node_run,
                                                                          tmp_path):
    out = tmp_path / "pre"
    res = submit(cluster, out, "--nodes", "2", "--zero", "2", "--max-requeues", "2",
                 env=slow_steps.env(0.5, cluster.env))  # slow steps, to signal mid-run
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


def test_term_checkpoints_and_is_not_requeued_and_the_run_resumes(cluster, two_node_run,
                                                                  tmp_path):
    """scancel: TERM to the batch script and to each node's task (only those under
    proctrack/cgroup), KILL after KillWait. The training checkpoints the step it is on; the job
    ends cancelled, not requeued; the same command resumes it to the uninterrupted result."""
    out = tmp_path / "term"
    res = submit(cluster, out, "--nodes", "2", "--zero", "2",
                 env=slow_steps.env(0.5, cluster.env))
    assert res.returncode == 0, res.stderr[-3000:]
    jid = job_id(out)
    t0 = time.time()
    while not ((out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= 3):
        assert time.time() - t0 < 300, "training did not start"
        time.sleep(0.2)
    cluster.run("scancel", jid)
    info = wait_state(cluster, jid)
    log = log_of(out, jid)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log[-4000:]
    assert "node 0: TERM -> asking the training to checkpoint" in log
    assert "death signal" not in log  # torchrun's agent left TERM alone
    assert "run status 'preempted', signal TERM" in log and "not requeueing" in log
    attempts = json.loads((out / "manifest.json").read_text())["attempts"]
    assert attempts[-1]["ended"].startswith("preempted at step")
    step = int(attempts[-1]["ended"].split()[3])
    newest = list_checkpoints(out)[-1]
    assert newest.name == f"step-{step:08d}" and verify(newest) is None

    res = submit(cluster, out, "--nodes", "2", "--zero", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    jid = job_id(out)
    info = wait_state(cluster, jid)
    log = log_of(out, jid)
    assert info["JobState"] == "COMPLETED" and "resumed from" in log, log[-4000:]
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
    res = submit(cluster, out, "--time", "not-a-time")
    assert res.returncode == 2 and "--time 'not-a-time': not a SLURM time" in res.stderr
    assert not out.exists()
    # sbatch itself refusing (more memory than a node has) also leaves nothing behind
    res = submit(cluster, out, "--mem", "100000G")
    assert res.returncode == 5 and "cluster error: sbatch refused the job" in res.stderr
    assert not out.exists()


def test_status_logs_cancel(cluster, tmp_path):
    out = tmp_path / "conv"
    res = submit(cluster, out, env=slow_steps.env(1, cluster.env))
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


def test_term_to_every_process_of_the_node_script_still_checkpoints(tmp_path):
    """No cluster: the rendered node script runs a real 2-process `accelerate launch` here, and
    TERM goes to every process under it at once (the node shell, the launcher with torchrun's
    agent, the training processes), as Slurm's proctrack/linuxproc delivers it. The agent must
    not act on it (its own handler would SIGKILL the training 30 s later, mid-checkpoint)."""
    out = tmp_path / "run"
    r = render(str(DEMO_CONFIG), SlurmOptions(nodes=1, nproc_per_node=2, signal_seconds=200),
               SETS, str(out))
    node = tmp_path / "node.sh"
    node.write_text(r.node)
    env = dict(slow_steps.env(1), SFT_SCALE_PYTHON=sys.executable, SLURM_NODEID="0",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    p = subprocess.Popen(["bash", str(node)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not ((out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= 2):
        assert p.poll() is None, p.communicate()[0][-4000:]
        assert time.time() - t0 < 300, "training did not start"
        time.sleep(0.2)
    tree = _descendants(p.pid)
    assert len(tree) >= 3  # launcher and two training processes
    for pid in [p.pid] + tree:
        os.kill(pid, signal.SIGTERM)
    log, _ = p.communicate(timeout=300)
    assert "death signal" not in log, log[-4000:]
    assert "node 0: TERM -> asking the training to checkpoint" in log
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "preempted", log[-4000:]
    step = int(m["attempts"][-1]["ended"].split()[3])
    newest = list_checkpoints(out)[-1]
    assert newest.name == f"step-{step:08d}" and verify(newest) is None


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found
