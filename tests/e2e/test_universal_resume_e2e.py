"""A DeepSpeed checkpoint resumed on another number of processes, through DeepSpeed's universal
checkpoint (ds_to_universal, then load_universal), with the same global batch: 2 -> 1 -> 2
processes train exactly as one uninterrupted run."""

import subprocess
import sys

import pytest

from tests.helpers import DEMO_CONFIG, ROOT, free_port, losses

pytestmark = pytest.mark.slow

# Global batch 8 = 4 micro x 2 accumulation x 1 process = 4 x 1 x 2 processes. A constant
# learning rate, so runs of different lengths follow the same schedule; no dropout, so the
# per-rank RNG (which cannot be mapped across world sizes) does not matter.
SETS = ("training.micro_batch_size=4", "training.logging_steps=1", "distributed.zero=2",
        "training.lr_scheduler=constant", "training.warmup_steps=0", "lora.dropout=0.0")


def train(out, nproc, steps, *sets):
    cmd = [sys.executable, str(ROOT / "sft_scale" / "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
               "--use_deepspeed", "--deepspeed_config_file",
               str(ROOT / "ds_configs" / "zero2.json"),
               "--main_process_port", str(free_port()), str(ROOT / "sft_scale" / "train.py")]
    accum = 2 // nproc
    cmd += ["--config", str(DEMO_CONFIG), "--output-dir", str(out)]
    for s in SETS + (f"training.max_steps={steps}",
                     f"training.gradient_accumulation_steps={accum}") + sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def test_resume_two_to_one_to_two_processes_equals_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    train(ref, 1, 6)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(a, 2, 2)
    proc = train(b, 1, 4, f"checkpoint.resume={a / 'checkpoints' / 'step-00000002'}")
    assert "resumed through the universal checkpoint" in proc.stderr
    assert (a / "checkpoints" / "step-00000002" / "universal" / "COMPLETE").is_file()
    proc = train(c, 2, 6, f"checkpoint.resume={b / 'checkpoints' / 'step-00000004'}")
    assert "resumed through the universal checkpoint" in proc.stderr
    assert losses(a) + losses(b) + losses(c) == pytest.approx(losses(ref), rel=1e-4)

