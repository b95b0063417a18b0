"""Issue 16 end to end: tampered checkpoints never execute (DeepSpeed resume and export), refused
resumes write nothing, one run per output dir, a diverged loss stops with the last good
checkpoint kept, a signal during the first step exits at once, classification adapters merge
with their head."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sft_scale.training import checkpoint as ckpt
from tests import slow_steps
from tests.helpers import DEMO_CONFIG, ROOT, TRAIN, run_train

pytestmark = pytest.mark.slow
SMALL = ("training.max_steps=2", "training.micro_batch_size=4", "checkpoint.every_steps=1",
         "training.logging_steps=1", "training.warmup_steps=0",
         "logging.plot=false", "logging.tensorboard=false", "eval.every_steps=0")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tamper(folder, relative, marker):
    """Replace one file by a pickle payload and regenerate COMPLETE to match, as an attacker
    with write access to a shared run folder would."""
    torch.save({"module": Payload(marker)}, folder / relative)
    (folder / ckpt.MARKER).write_text(json.dumps({"step": 0, "files": ckpt._inventory(folder)}))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sft_scale.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def train(out, *sets, env=None):
    args = [sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), "--output-dir", str(out)]
    for s in SMALL + sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, **(env or {})))


def test_deepspeed_resume_and_export_never_run_a_tampered_checkpoint(tmp_path):
    out, marker = tmp_path / "ds", tmp_path / "pwned"
    ds = ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / "zero2.json")]
    run_train(out, *SMALL, nproc=1, extra_launch=ds)
    step1, step2 = (out / "checkpoints" / f"step-0000000{i}" for i in (1, 2))
    tamper(step2, "pytorch_model/mp_rank_00_model_states.pt", marker)

    res = cli("export", "--run", out, "--out", tmp_path / "x", "--checkpoint", step2)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "mp_rank_00_model_states.pt references posix.system" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x").exists()
    # the newest intact checkpoint exports (DeepSpeed's zero_to_fp32, weights-only)
    res = cli("export", "--run", out, "--out", tmp_path / "y")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping checkpoint" in res.stderr and "step-00000001" in (
        tmp_path / "y" / "export_info.json").read_text()

    # resume (the run looks interrupted): skips the tampered one, resumes from step 1 through
    # DeepSpeed's loader with weights-only loading forced
    (out / "adapter").rename(tmp_path / "old_adapter")
    proc = run_train(out, *SMALL, nproc=1, extra_launch=ds)
    assert "references posix.system" in proc.stderr and "resumed from" in proc.stderr
    assert "step-00000001 at step 1" in proc.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    old = os.umask(0o022)
    try:
        proc = train(out)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_outputs_follow_the_umask(finished):
    for rel in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                "manifest.json", "summary.json", "config.resolved.yaml", "probe.safetensors",
                "metrics.jsonl"):
        assert (finished / rel).stat().st_mode & 0o777 == 0o644, rel
    assert (finished / "adapter").stat().st_mode & 0o777 == 0o755
    assert not (finished / ".run.lock").exists()  # released at the end


@pytest.mark.parametrize("sets,expected", [
    (("lora.r=4",), "LoRA shape"),
    (("training.learning_rate=0.001",), r"training\.learning_rate \(0\.003 -> 0\.001\)"),
    (("training.max_steps=1",), "at step 2, beyond this run's 1 total steps"),
])  # (the other keys of the policy: tests/unit/training/test_checkpoint_safety.py)
def test_a_refused_resume_rewrites_nothing(finished, tmp_path, sets, expected):
    out = tmp_path / "r"
    subprocess.run(["cp", "-a", str(finished), str(out)], check=True)
    (out / "adapter").rename(tmp_path / "adapter")  # an interrupted run
    before = {p: (out / p).read_bytes() for p in ("manifest.json", "config.resolved.yaml",
                                                   "metrics.jsonl")}
    proc = train(out, *sets)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error" in proc.stderr and "Traceback" not in proc.stderr
    assert __import__("re").search(expected, proc.stderr), proc.stderr[-2000:]
    assert {p: (out / p).read_bytes() for p in before} == before
    assert not (out / ".run.lock").exists()


def test_refused_before_weights_or_writes(tmp_path):
    huge = train(tmp_path / "huge", "training.micro_batch_size=100000000")
    assert huge.returncode == 2
    assert "micro_batch_size is 100000000, more than the 600" in huge.stderr
    assert not (tmp_path / "huge").exists()
    missing = train(tmp_path / "m", "checkpoint.resume=/nonexistent")
    assert missing.returncode == 2 and "/nonexistent: no such folder" in missing.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(),
                                                "started_at": "earlier"}))
    held = train(busy)
    assert held.returncode == 2, held.stderr[-2000:]
    assert f"in use by another run (host {os.uname().nodename}, pid {os.getpid()}" in held.stderr
    assert sorted(p.name for p in busy.iterdir()) == [".run.lock"]
    afile = tmp_path / "afile"
    afile.write_text("")
    res = train(afile)
    assert res.returncode == 2 and "is a file, not a folder" in res.stderr


def test_a_diverging_loss_stops_with_exit_6_and_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = train(out, "training.learning_rate=1e30", "training.max_steps=6",
                 "training.warmup_steps=0", "training.max_grad_norm=0")
    assert proc.returncode == 6, proc.stderr[-3000:]
    assert "training diverged: the training loss became" in proc.stderr
    assert not (out / "adapter").exists()
    good = [p for p in ckpt.list_checkpoints(out) if ckpt.verify(p) is None]
    assert good and all(torch.isfinite(torch.tensor(
        json.loads((p / "trainer_state.json").read_text())["losses"])).all() for p in good)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and "loss became" in m["attempts"][-1]["ended"]


def test_a_signal_before_the_first_step_finished_exits_75_at_once(tmp_path):
    out = tmp_path / "sig"
    args = [sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), "--output-dir", str(out)]
    for s in SMALL:
        args += ["--set", s]
    # steps held for 120 s each, so that only an immediate exit passes the time limit below
    proc = subprocess.Popen(args, cwd=ROOT, env=slow_steps.env(120),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # data checked and records written; model and first step to come
        lines.append(line)
        if line.startswith("resolved config:"):
            break
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    log = "".join(lines) + proc.communicate(timeout=100)[0]
    assert proc.returncode == 75, log[-3000:]
    assert time.time() - sent < 60 and "before the first step of this attempt finished" in log
    assert not ckpt.list_checkpoints(out) and not (out / ".run.lock").exists()


def test_a_classification_adapter_merges_into_a_classifier_with_its_head(tmp_path):
    out = tmp_path / "cls"
    run_train(out, "training.max_steps=3", "training.warmup_steps=0", "logging.plot=false",
              "eval.every_steps=0",
              config=ROOT / "examples" / "classification.yaml")
    res = cli("merge", "--adapter", out / "adapter", "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["kind"] == "sequence classification" and report["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification")
    from safetensors.torch import load_file
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    head = next(v for k, v in adapter.items() if k.endswith("score.weight"))
    assert torch.equal(merged["score.weight"], head)
