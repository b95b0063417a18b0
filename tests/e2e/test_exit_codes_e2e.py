"""One end-to-end test per error class, each a real `train.py` or `sft-scale` process that fails
the way a user meets it: one line naming the problem on stderr, no traceback, its documented
exit code, nothing half-written.

The classes whose end-to-end tests live elsewhere (file: test):
  ConfigError 2      test_config_refusals_e2e, test_safety_e2e: test_refused_before_weights_...
  DataError 2        test_data_e2e: test_bad_data_fails_before_anything_is_written
  CheckpointError 3  test_resume_e2e: test_full_disk_keeps_the_previous_checkpoint (root only)
  DivergedError 6    test_safety_e2e: test_a_diverging_loss_stops_with_exit_6_and_the_last_...
  preempted 75       test_safety_e2e (before the first step), test_resume_e2e (after it)
  ClusterError 5     test_slurm_e2e (sbatch refusing on a real cluster)
Here: CheckpointError, OutputWriteError, MergeError and ClusterError on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_train

SMALL = ("training.max_steps=1", "training.micro_batch_size=4", "training.warmup_steps=0",
         "checkpoint.every_steps=0", "eval.every_steps=0", "logging.plot=false",
         "logging.tensorboard=false")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sft_scale.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def one_line(proc, code: int, starts: str) -> str:
    """The process failed with `code` and said so in one line starting with `starts`."""
    err = proc.stderr.strip()
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith(starts))
    return line


@pytest.mark.slow
def test_resuming_from_a_folder_that_is_no_checkpoint_is_exit_3(tmp_path):
    half = tmp_path / "step-00000004"  # what a writer killed mid-save leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 64)
    out = tmp_path / "run"
    proc = run_train(out, *SMALL, f"checkpoint.resume={half}", check=False)
    line = one_line(proc, 3, "checkpoint error:")
    assert line == (f"checkpoint error: checkpoint.resume={half}: cannot resume from it: "
                    "incomplete (no COMPLETE marker: the writer died or is still writing)")
    assert not out.exists()


@pytest.mark.slow
def test_an_output_that_cannot_be_written_is_exit_3_recorded_in_the_manifest(tmp_path):
    out = tmp_path / "run"
    (out / "summary.json").mkdir(parents=True)  # the last write of a run hits a folder
    proc = run_train(out, *SMALL, check=False)
    line = one_line(proc, 3, "write error:")
    assert line.startswith(f"write error: could not write the summary in {out}: ")
    assert "Is a directory" in line and "The last good checkpoint (step-00000001) is intact" \
        in line
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and "write error: could not write the summary" in \
        m["attempts"][-1]["ended"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # what came before stays
    assert not (out / ".run.lock").exists()


@pytest.mark.slow
def test_a_merge_that_fails_verification_is_exit_4_and_writes_nothing(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft_scale.model_source import resolve_model_path

    base = resolve_model_path("builtin:tiny-llama")
    adapter = tmp_path / "adapter"
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    # The adapter carries an edited tokenizer (lower-cases its input): a merged model saved
    # with it would read text differently from the base it was trained on.
    for name in ("tokenizer_config.json", "tokenizer.json"):
        (adapter / name).write_text((Path(base) / name).read_text())
    tok = json.loads((adapter / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    (adapter / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "merged"
    proc = cli("merge", "--adapter", adapter, "--out", out)
    line = one_line(proc, 4, "merge error:")
    assert line == ("merge error: the tokenizer saved with the merged model tokenizes "
                    f"differently from the base's ({base}); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_cluster_that_cannot_be_reached_is_exit_5(tmp_path):
    out = tmp_path / "run"
    (out / "slurm").mkdir(parents=True)
    (out / "slurm" / "jobs.jsonl").write_text('{"job_id": "42"}\n')
    (tmp_path / "bin").mkdir()  # a PATH without the SLURM client tools
    for command in ("status", "cancel"):
        proc = cli("slurm", command, "--output-dir", out,
                   env=dict(os.environ, PATH=str(tmp_path / "bin")))
        line = one_line(proc, 5, "cluster error:")
        assert line.startswith("cluster error: 'sc") and "' not found: run this on a SLURM " \
            "login node (or install the SLURM client tools)" in line
        assert proc.stdout == ""
