"""Rendering sbatch scripts (no cluster needed)."""

import subprocess
import sys

from sft_scale.slurm import SlurmOptions, render
from tests.conftest import DEMO_CONFIG, ROOT


def test_multi_node_script_has_everything(tmp_path):
    opts = SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", account="proj", qos="high",
                        constraint="h100", time="12:00:00", cpus_per_task=64, mem="0",
                        extra_sbatch=["--exclusive"], setup=["module load cuda/12.4"],
                        zero=2, signal_seconds=300, max_requeues=5)
    r = render(str(DEMO_CONFIG), opts, ["training.max_steps=6"], str(tmp_path / "out"))
    s = r.sbatch
    assert s.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --time=12:00:00",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --mem=0", "#SBATCH --exclusive",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "module load cuda/12.4",
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 40000 ))", "OMP_NUM_THREADS:-8",
                 'if [ "$ATTEMPT" -le 5 ]', f"--output={tmp_path}/out/slurm/%x-%j.log"):
        assert line in s, line
    n = r.node
    assert "--num_processes 32 --multi_gpu --num_machines 4 --machine_rank ${SLURM_NODEID}" in n
    assert "--main_process_ip ${MASTER_ADDR} --main_process_port ${MASTER_PORT}" in n
    assert "distributed.deepspeed_config=" in n and "zero2.json" in n
    assert "trap '' USR1 TERM" in n and 'pkill -USR1 -P "$launcher"' in n
    # both scripts are valid bash
    for text in (s, n):
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_dry_run_prints_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "sft_scale.cli", "slurm", "submit", "--config",
                          str(DEMO_CONFIG), "--nodes", "1", "--output-dir", str(out), "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH --nodes=1" in res.stdout and "MASTER_ADDR" not in res.stdout
    assert not out.exists()
