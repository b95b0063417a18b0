"""The rendered SLURM job, line by line, and run: the batch script and the node script execute here
with stand-ins for `srun`/`scontrol` (no cluster) and for `accelerate launch` (a launcher that
starts one worker process, which writes the run's manifest as train.py does and exits as it
would). tests/e2e/test_slurm_e2e.py runs the same scripts on a real two-node SLURM."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_scale.config import ConfigError
from sft_scale.preflight.slurm import (
    PORT_BASE,
    PORT_SPAN,
    REPO_ROOT,
    SlurmOptions,
    _local_model,
    render,
    signal_window,
    time_limit_seconds,
)
from tests.helpers import DEMO_CONFIG, ROOT

HOSTILE = "o u't \"q\" $(touch PWNED1) `touch PWNED2`; touch PWNED3 %j"


def lines(text: str) -> list[str]:
    return text.splitlines()


def bash_ok(text: str) -> bool:
    return subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


# ---- rendered scripts, line by line -----------------------------------------------------------

def test_four_node_script_line_by_line(tmp_path):
    opts = SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", account="proj", qos="high",
                        constraint="h100&ib", time="12:00:00", extra_sbatch=["--reservation=r1"],
                        setup=["module load cuda/12.4", "export NCCL_SOCKET_IFNAME=ib0"],
                        zero=2, signal_seconds=300, max_requeues=5,
                        python="/opt/my env/bin/python")
    r = render(str(DEMO_CONFIG), opts, ["training.max_steps=6"], str(tmp_path / "out"))
    s, out = lines(r.sbatch), tmp_path / "out"
    assert s[0] == "#!/bin/bash"
    sbatch = [x for x in s if x.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=sft-scale", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=64",  # 8 CPUs per GPU by default
        "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --mem=0",
        "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
        "#SBATCH --qos=high", "#SBATCH --constraint=h100&ib",
        f'#SBATCH --output="{out}/slurm/%x-%j.log"', "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --reservation=r1"]
    assert "export OMP_NUM_THREADS=8" in s  # 64 CPUs over 8 processes
    assert "export HF_HUB_OFFLINE=1" in s  # builtin model: local
    # the setup lines come after our defaults (so they can override them) and before set -u
    assert s.index("module load cuda/12.4") > s.index("export OMP_NUM_THREADS=8")
    assert s.index("export NCCL_SOCKET_IFNAME=ib0") < s.index("set -uo pipefail")
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in s
    assert f"export MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))" in s
    assert "SFT_SCALE_PYTHON=$(command -v '/opt/my env/bin/python') || {" in s
    assert f"\"$SFT_SCALE_PYTHON\" - {REPO_ROOT} <<'PY' || {{" in r.sbatch
    assert "trap 'got=TERM; log \"TERM: Slurm is ending this job; the training is " \
           "checkpointing\"' TERM" in s
    srun = [x for x in s if "srun" in x and not x.startswith("#")]
    # Several nodes: the data is tokenized once by one task first (data prepare), then trained.
    assert srun == ["if ! run_step srun --label --nodes=1 --ntasks=1 --cpus-per-task=64 "
                    "\"$SFT_SCALE_PYTHON\" -m sft_scale.cli data prepare --config "
                    f"{DEMO_CONFIG} --output-dir {out} --set training.max_steps=6; then",
                    "run_step srun --label --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=1 "
                    f"--cpus-per-task=64 bash {r.node_path}"]
    assert '    if [ "$ATTEMPT" -le 5 ]; then' in s
    assert f"ended=$(\"$SFT_SCALE_PYTHON\" - {out}/manifest.json \"$rc\" <<'PY'" in s

    n = lines(r.node)
    assert n[0] == "#!/bin/bash"
    assert "export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT" in n  # the agent leaves TERM be
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in n
    assert n.index("trap '' USR1 TERM") < n.index("launcher=$!") - 1  # ignored by the launcher
    launch = n[n.index("launcher=$!") - 1]
    assert launch.startswith('"$SFT_SCALE_PYTHON" -m accelerate.commands.launch --num_processes '
                             "32 --multi_gpu --num_machines 4 --machine_rank ${SLURM_NODEID} "
                             "--main_process_ip ${MASTER_ADDR} --main_process_port "
                             "${MASTER_PORT} --rdzv_backend static ")
    assert launch.endswith(" &") and "zero2.json" in launch
    assert "--set training.max_steps=6" in launch and f"--output-dir {out} &" in launch
    assert "trap 'forward USR1' USR1" in n and "trap 'forward TERM' TERM" in n
    assert '  pkill -USR1 -P "$launcher" || true' in n
    assert bash_ok(r.sbatch) and bash_ok(r.node)


def test_one_node_script(tmp_path):
    r = render(str(DEMO_CONFIG), SlurmOptions(nodes=1, gpus_per_node=2, cpus_per_task=6),
               [], str(tmp_path / "out"))
    s = lines(r.sbatch)
    assert "#SBATCH --cpus-per-task=6" in s and "export OMP_NUM_THREADS=3" in s
    assert not [x for x in s if "--exclusive" in x or "--mem" in x or "MASTER_ADDR" in x]
    assert f"export MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))" in s
    assert "SFT_SCALE_PYTHON=$(command -v python) || {" in s  # the job's own python by default
    assert "--nodes=1 --ntasks-per-node=1 --cpus-per-task=6 bash" in r.sbatch
    assert "--num_processes 2 --multi_gpu --main_process_port ${MASTER_PORT}" in r.node
    assert bash_ok(r.sbatch) and bash_ok(r.node)
    # --exclusive and --mem can be set for one node too, and turned off for several
    r = render(str(DEMO_CONFIG), SlurmOptions(nodes=1, exclusive=True, mem="64G"), [],
               str(tmp_path / "out"))
    assert "#SBATCH --exclusive\n#SBATCH --mem=64G\n" in r.sbatch
    r = render(str(DEMO_CONFIG), SlurmOptions(nodes=2, exclusive=False), [], str(tmp_path / "o"))
    assert "--exclusive" not in r.sbatch and "--mem" not in r.sbatch


def test_master_port_stays_below_the_ephemeral_range():
    for job_id in (0, 1, 12767, 12768, 32768, 60999, 10 ** 9 + 7):
        port = PORT_BASE + job_id % PORT_SPAN
        assert 1024 < port < 32768, (job_id, port)


def test_hf_hub_offline_only_for_local_models(tmp_path):
    model = next(Path(os.environ["SFT_SCALE_HOME"]).glob("tiny-llama-*"))  # a model folder
    r = render(str(DEMO_CONFIG), SlurmOptions(), [f"model.name_or_path={model}"],
               str(tmp_path / "o"))
    assert "export HF_HUB_OFFLINE=1" in lines(r.sbatch)
    # A hub id: the nodes may need the hub (render refuses one that is neither cached nor
    # reachable, so the choice itself is tested here)
    assert not _local_model("someorg/some-model") and _local_model("builtin:tiny-llama")


# ---- the signal window -----------------------------------------------------------------------

def test_signal_window_from_checkpoint_size_and_bandwidth(tmp_path):
    from sft_scale.config import load_config

    cfg = load_config(str(DEMO_CONFIG))
    small, why = signal_window(cfg, SlurmOptions())
    assert small == 120 and "at least 120 s" in why  # a LoRA checkpoint of a tiny model
    # Full fine-tuning of the same model over a slow filesystem: the window grows with the size.
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False))
    from sft_scale.preflight.slurm import checkpoint_bytes

    size = checkpoint_bytes(cfg)
    seconds, why = signal_window(cfg, SlurmOptions(write_bandwidth="1KB"))
    assert seconds == -(-2 * size // 1000) + 60 and f"{size / 1e9:.3g} GB" in why
    assert signal_window(cfg, SlurmOptions(signal_seconds=77)) == (77, "set with --signal-seconds")
    with pytest.raises(ConfigError, match="not shorter than --time 1"):
        signal_window(cfg, SlurmOptions(signal_seconds=90, time="1"))


def test_time_syntax():
    assert time_limit_seconds("90") == 5400
    assert time_limit_seconds("10:30") == 630
    assert time_limit_seconds("04:00:00") == 14400
    assert time_limit_seconds("1-12") == 129600
    assert time_limit_seconds("1-00:30:05") == 88205
    assert time_limit_seconds("UNLIMITED") is None


# ---- hostile values --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    ({"job_name": "x\ntouch /tmp/PWNED"}, "--job-name"),
    ({"partition": "gpu\ntouch /tmp/PWNED"}, "--partition"),
    ({"time": "1:00:00\ntouch /tmp/PWNED"}, "--time"),
    ({"extra_sbatch": ["--exclusive\ntouch /tmp/PWNED"]}, "--extra-sbatch"),
    ({"account": "a b"}, "--account"), ({"qos": "q;touch"}, "--qos"),
    ({"constraint": "h100\n"}, "--constraint"), ({"mem": "lots"}, "--mem"),
    ({"time": "soon"}, "--time"), ({"python": "py\nthon"}, "--python"),
    ({"nodes": 0}, "--nodes"), ({"signal_seconds": -5}, "--signal-seconds"),
    ({"nproc_per_node": 0}, "--nproc-per-node"), ({"max_requeues": -1}, "--max-requeues"),
    ({"write_bandwidth": "fast"}, "--write-bandwidth"),
])
def test_refused_option_values(tmp_path, kwargs, flag):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        render(str(DEMO_CONFIG), SlurmOptions(**kwargs), [], str(tmp_path / "out"))


def test_output_dir_with_a_newline_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="control character"):
        render(str(DEMO_CONFIG), SlurmOptions(), [], str(tmp_path / "a\ntouch PWNED"))


def test_cli_refusals_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    for args, text in ((["--nodes", "0"], "--nodes 0: must be >= 1"),
                       (["--job-name", "a\nb"], "--job-name 'a\\nb': not valid SLURM syntax")):
        res = subprocess.run([sys.executable, "-m", "sft_scale.cli", "slurm", "submit",
                              "--config", str(DEMO_CONFIG), "--output-dir", str(out), *args],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 2 and text in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()
    (out / "slurm").mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "sft_scale.cli", "slurm", "logs", "-n", "0",
                          "--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "-n/--lines 0: must be >= 1" in res.stderr


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs SLURM's scontrol")
def test_status_without_a_reachable_controller_is_a_cluster_error(tmp_path):
    conf = tmp_path / "slurm.conf"  # a controller on a port nobody listens on
    conf.write_text("ClusterName=none\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
                    "AuthType=auth/munge\nMessageTimeout=1\nTCPTimeout=1\n"
                    "NodeName=n1 CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=n1 Default=YES\n")
    out = tmp_path / "out"
    (out / "slurm").mkdir(parents=True)
    (out / "slurm" / "jobs.jsonl").write_text('{"job_id": "42"}\n')
    res = subprocess.run([sys.executable, "-m", "sft_scale.cli", "slurm", "status",
                          "--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, SLURM_CONF=str(conf)), timeout=120)
    assert res.returncode == 5, res.stdout + res.stderr
    assert res.stderr.startswith("cluster error: scontrol show job 42 failed: ")
    assert "Unable to contact slurm controller" in res.stderr and not res.stdout


# ---- running the scripts with stand-ins ------------------------------------------------------

LAUNCHER = r'''
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_DIR"] + "/launch_args.json", "w") as f:
    json.dump(args, f)
out = args[args.index("--output-dir") + 1]
worker = subprocess.Popen([sys.executable, os.environ["STUB_DIR"] + "/worker.py", out])
sys.exit(worker.wait())
'''

# What train.py does to the manifest, by scenario: its attempt record (this job id and restart
# count, as manifest.attempt_record takes them from the environment) and the run status.
WORKER = r'''
import json, os, signal, sys, time
out, scenario = sys.argv[1], os.environ["STUB_SCENARIO"]
path = os.path.join(out, "manifest.json")

def record(ended, status):
    m = json.load(open(path)) if os.path.exists(path) else {}
    m.setdefault("attempts", []).append({
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), "ended": ended})
    m["status"] = status
    json.dump(m, open(path, "w"))

def preempted(signum, _):
    record(f"preempted at step 3 ({signal.Signals(signum).name})", "preempted")
    sys.exit(75)

if scenario == "completed":
    record("completed", "completed")
elif scenario == "crash":
    sys.exit(1)
elif scenario == "preempted":
    record("preempted at step 3 (USR1)", "preempted")
    sys.exit(75)
elif scenario == "wait":
    signal.signal(signal.SIGUSR1, preempted)
    signal.signal(signal.SIGTERM, preempted)
    open(os.path.join(os.environ["STUB_DIR"], "ready"), "w").close()
    while True:
        time.sleep(0.05)
'''


def _stubs(tmp_path: Path) -> Path:
    """bin/ with srun, scontrol and python stand-ins; returns the stub folder."""
    d = tmp_path / "stub"
    (d / "bin").mkdir(parents=True)
    (d / "launcher.py").write_text(LAUNCHER)
    (d / "worker.py").write_text(WORKER)
    scripts = {
        # srun: record the options, write our pid (the node shell's, after exec), run the command
        "srun": 'echo "$*" >> "$STUB_DIR/srun.log"\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                'echo $$ > "$STUB_DIR/step.pid"\nexec "$@"\n',
        "scontrol": 'echo "$*" >> "$STUB_DIR/scontrol.log"\n'
                    '[ "$1 $2" = "show hostnames" ] && echo n1\nexit 0\n',
        # python: accelerate launch -> the stand-in launcher; the import check is skipped (the
        # e2e tests run it for real); anything else -> this interpreter
        "python": f'if [ "$1 $2" = "-m accelerate.commands.launch" ]; then shift 2; exec '
                  f'{sys.executable} "$STUB_DIR/launcher.py" "$@"; fi\n'
                  f'if [ "$1 $2" = "- {REPO_ROOT}" ]; then cat > /dev/null; exit 0; fi\n'
                  f'exec {sys.executable} "$@"\n',
    }
    for name, body in scripts.items():
        p = d / "bin" / name
        p.write_text("#!/bin/bash\n" + body)
        p.chmod(0o755)
    return d


def _write(r) -> None:
    r.node_path.parent.mkdir(parents=True, exist_ok=True)
    r.script_path.write_text(r.sbatch)
    r.node_path.write_text(r.node)


def _job(stub: Path, r, scenario: str, restart: int | None = None, job_id: str = "4242"):
    env = dict(os.environ, STUB_DIR=str(stub), STUB_SCENARIO=scenario, SLURM_JOB_ID=job_id,
               SLURM_JOB_NODELIST="n1", SLURM_NODEID="0",
               PATH=f"{stub / 'bin'}:{os.environ['PATH']}")
    env.pop("SLURM_RESTART_COUNT", None)
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = str(restart)
    return subprocess.Popen(["bash", str(r.script_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run_job(stub, r, scenario, restart=None):
    p = _job(stub, r, scenario, restart)
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


def _requeues(stub: Path) -> list[str]:
    log = stub / "scontrol.log"
    return [x for x in log.read_text().splitlines() if x.startswith("requeue")] \
        if log.exists() else []


@pytest.fixture
def job(tmp_path):
    stub = _stubs(tmp_path)
    # No `data prepare` pre-step: it is ~10 s of real imports per attempt and these tests are
    # about how an attempt ends; the pre-step runs in test_pre_step_runs_quoted_on_one_node_...
    # and for real in tests/e2e/test_slurm_e2e.py.
    r = render(str(DEMO_CONFIG), SlurmOptions(nodes=2, max_requeues=2, prepare_data=False), [],
               str(tmp_path / "run"))
    _write(r)
    return stub, r


def test_completed_run_exits_0_without_requeue(job):
    stub, r = job
    rc, out = _run_job(stub, r, "completed")
    assert rc == 0, out
    assert "attempt 1 ended: exit 0, run status 'completed'" in out and not _requeues(stub)


def test_preempted_run_requeues_until_the_cap(job):
    stub, r = job
    rc, out = _run_job(stub, r, "preempted")
    assert rc == 0 and "requeueing (requeue 1 of at most 2)" in out, out
    assert _requeues(stub) == ["requeue 4242"]
    rc, out = _run_job(stub, r, "preempted", restart=1)
    assert rc == 0 and len(_requeues(stub)) == 2, out
    rc, out = _run_job(stub, r, "preempted", restart=2)  # attempt 3 > 2 requeues
    assert rc == 75 and "requeue cap (2) reached" in out, out
    assert len(_requeues(stub)) == 2


def test_crash_after_a_preemption_is_not_requeued(job):
    """Attempt 1 was preempted (the manifest says so); attempt 2 crashes before train.py writes
    anything: the stale "preempted" must not requeue it."""
    stub, r = job
    rc, _ = _run_job(stub, r, "preempted")
    assert rc == 0 and json.loads((r.output_dir / "manifest.json").read_text())["status"] \
        == "preempted"
    rc, out = _run_job(stub, r, "crash", restart=1)
    assert rc == 1, out
    assert "attempt 2 ended: exit 1, run status 'none'" in out
    assert "failed without a preemption checkpoint of its own: not requeued" in out
    assert _requeues(stub) == ["requeue 4242"]  # only attempt 1's


def test_a_crash_fails_the_job(job):
    stub, r = job
    rc, out = _run_job(stub, r, "crash")
    assert rc == 1 and not _requeues(stub), out


def test_a_run_already_completed_exits_0(job):
    stub, r = job
    (r.output_dir / "manifest.json").write_text(json.dumps(
        {"status": "completed", "attempts": [{"slurm_job_id": "1", "ended": "completed"}]}))
    rc, out = _run_job(stub, r, "noop")
    assert rc == 0 and "run status 'completed'" in out and not _requeues(stub), out


def _signalled_job(job, *signals):
    """Start the job, wait for the worker, send each (signal, target) like Slurm does, finish."""
    stub, r = job
    p = _job(stub, r, "wait")
    ready = stub / "ready"
    t0 = time.time()
    while not ready.exists():
        assert p.poll() is None, p.communicate()[0]
        assert time.time() - t0 < 120, "worker did not start"
        time.sleep(0.05)
    node_shell = int((stub / "step.pid").read_text())
    for sig, target in signals:
        os.kill(p.pid if target == "batch" else node_shell, sig)
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


def test_usr1_before_the_time_limit_checkpoints_and_requeues(job):
    """--signal=USR1@N: Slurm signals the step's task (our node shell), which passes it on."""
    rc, out = _signalled_job(job, (signal.SIGUSR1, "node"))
    stub, r = job
    assert "node 0: USR1 -> asking the training to checkpoint" in out
    assert rc == 0 and "run status 'preempted'" in out and _requeues(stub) == ["requeue 4242"]


def test_term_checkpoints_and_is_not_requeued(job):
    """scancel / preemption / time limit: TERM to the batch shell and to the node shell (only
    those under proctrack/cgroup). The training checkpoints; the job is not requeued by us."""
    rc, out = _signalled_job(job, (signal.SIGTERM, "batch"), (signal.SIGTERM, "node"))
    stub, r = job
    assert "node 0: TERM -> asking the training to checkpoint" in out
    assert "run status 'preempted', signal TERM" in out
    assert rc == 75 and "not requeueing: TERM means Slurm is ending the job" in out
    assert not _requeues(stub)


def test_a_python_without_sft_scale_stops_the_job_before_srun(tmp_path):
    py = shutil.which("python3", path="/usr/bin:/bin")
    if py is None or subprocess.run([py, "-c", "import torch"], capture_output=True).returncode \
            == 0:
        pytest.skip("needs a system python3 without torch")
    stub = _stubs(tmp_path)
    r = render(str(DEMO_CONFIG), SlurmOptions(python=py), [], str(tmp_path / "run"))
    _write(r)
    rc, out = _run_job(stub, r, "completed")
    assert rc == 2 and f"error: {py} cannot import sft_scale and its dependencies" in out, out
    assert not (stub / "srun.log").exists()
    r = render(str(DEMO_CONFIG), SlurmOptions(python="no-such-python"), [],
               str(tmp_path / "run"))
    _write(r)
    rc, out = _run_job(stub, r, "completed")
    assert rc == 2 and "no Python no-such-python on this node's PATH" in out


def test_hostile_paths_and_values_are_data_not_code(tmp_path):
    """`$(...)`, backticks, `;`, quotes, spaces and % in the output dir (from the CLI and from
    output.dir in a config file), in the config path, in --set values, in the python path and
    in an extra #SBATCH option (a comment to bash; sbatch runs no shell):
    the scripts pass bash -n, run, hand each value over as one argument, and run nothing."""
    stub = _stubs(tmp_path)
    hostile = tmp_path / HOSTILE
    conf_dir = tmp_path / ("conf " + HOSTILE)
    conf_dir.mkdir()
    config = conf_dir / "c $(touch PWNED4).yaml"
    config.write_text(DEMO_CONFIG.read_text().replace("dir: runs/demo",
                                                      f"dir: {json.dumps(str(hostile))}"))
    py = tmp_path / "py $(touch PWNED5)" / "python"
    py.parent.mkdir()
    py.symlink_to(stub / "bin" / "python")
    sets = ["model.revision=$(touch PWNED6)x"]
    for output_dir in (None, str(hostile)):  # from the config file, then from the CLI
        r = render(str(config), SlurmOptions(nodes=2, python=str(py), prepare_data=False,
                                             extra_sbatch=["--comment=$(touch PWNED7)"]),
                   sets, output_dir)
        assert r.output_dir == hostile
        assert bash_ok(r.sbatch) and bash_ok(r.node)
        _write(r)
        rc, out = _run_job(stub, r, "completed")
        assert rc == 0 and "run status 'completed'" in out, out  # read the hostile manifest
        args = json.loads((stub / "launch_args.json").read_text())
        assert args[args.index("--output-dir") + 1] == str(hostile)
        assert args[args.index("--config") + 1] == str(config)
        assert "model.revision=$(touch PWNED6)x" in args
        assert str(r.node_path) in (stub / "srun.log").read_text()
        (r.output_dir / "manifest.json").unlink()
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert not list(ROOT.glob("PWNED*"))


def test_pre_step_runs_quoted_on_one_node_before_training(tmp_path):
    stub = _stubs(tmp_path)
    r = render(str(DEMO_CONFIG), SlurmOptions(nodes=2, cpus_per_task=4), [],
               str(tmp_path / "run"),
               pre_step=["-c", "import sys; open(sys.argv[1], 'w').write('done')",
                         str(tmp_path / "pre $(touch PWNED).txt")])
    _write(r)
    rc, out = _run_job(stub, r, "completed")
    assert rc == 0, out
    calls = (stub / "srun.log").read_text().splitlines()
    assert calls[0].startswith("--label --nodes=1 --ntasks=1 --cpus-per-task=4 ")
    assert calls[1].startswith("--label --kill-on-bad-exit=1 --nodes=2")
    assert (tmp_path / "pre $(touch PWNED).txt").read_text() == "done"
    assert not list(tmp_path.rglob("PWNED"))


def test_dry_run_prints_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "sft_scale.cli", "slurm", "submit", "--config",
                          str(DEMO_CONFIG), "--nodes", "1", "--output-dir", str(out), "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH --nodes=1" in res.stdout and "MASTER_ADDR" not in res.stdout
    assert "# signal window: USR1 120 s before the time limit (checkpoint ~" in res.stdout
    assert not out.exists()
