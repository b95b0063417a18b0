"""Real multi-process DeepSpeed runs on CPU (gloo): every ZeRO stage, LoRA and full fine-tuning."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import (
    DEMO_CONFIG,
    ROOT,
    adapter,
    ds_launch,
    free_port,
    losses,
    read_jsonl,
    run_train,
)

pytestmark = pytest.mark.slow

SMALL = ("training.max_steps=4", "training.micro_batch_size=4", "training.logging_steps=1")


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("z2") / "run"
    # Through the shipped Accelerate YAML, so the launch/ file is exercised too.
    proc = run_train(out, *SMALL, "output.trace_samples=true", nproc=2,
                     extra_launch=["--config_file", str(ROOT / "launch" / "deepspeed_zero2.yaml")])
    return out, proc


def test_zero2_ranks_disjoint_and_equal_to_one_rank_with_twice_the_accumulation(zero2_run,
                                                                                 tmp_path):
    out, proc = zero2_run
    assert "distributed: DEEPSPEED, world size 2" in proc.stderr
    resolved = json.loads((out / "deepspeed.resolved.json").read_text())
    assert resolved["zero_optimization"]["stage"] == 2 and resolved["train_batch_size"] == 8
    ranks = [read_jsonl(out / "data_trace" / f"rank{r}.jsonl") for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    for a, b in zip(*ranks, strict=True):
        assert not set(a["examples"][0]) & set(b["examples"][0])

    one = tmp_path / "one"
    run_train(one, *SMALL, "training.gradient_accumulation_steps=2")
    assert losses(out) == pytest.approx(losses(one), rel=1e-4)
    a2, a1 = adapter(out), adapter(one)
    assert a2.keys() == a1.keys()
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], atol=1e-5, rtol=1e-4)


def test_zero3_saves_a_gathered_adapter_equal_to_zero2(zero2_run, tmp_path):
    z2, _ = zero2_run
    out = tmp_path / "z3"
    proc = run_train(out, *SMALL, nproc=2, extra_launch=ds_launch("zero3"))
    assert "distributed: DEEPSPEED, world size 2" in proc.stderr
    a3, a2 = adapter(out), adapter(z2)
    assert a3.keys() == a2.keys() and len(a3) > 0
    for k, v in a3.items():
        assert v.numel() > 0, f"{k} was saved empty (partitioned, not gathered)"
        torch.testing.assert_close(v, a2[k], atol=1e-5, rtol=1e-4)
    assert any(v.abs().sum() > 0 for k, v in a3.items() if "lora_B" in k)


@pytest.mark.parametrize("stage", ["zero0", "zero3"])
def test_full_finetune_saves_a_consolidated_model_plain_transformers_loads(tmp_path, stage):
    out = tmp_path / stage
    proc = run_train(out, *SMALL, "lora.enabled=false", "training.learning_rate=1e-4", nproc=2,
                     extra_launch=ds_launch(stage))
    assert "world size 2" in proc.stderr
    assert losses(out)[-1] < losses(out)[0]
    code = ("import sys, torch; from safetensors.torch import load_file;"
            "from transformers import AutoModelForCausalLM;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1] + '/model').eval();"
            "p = load_file(sys.argv[1] + '/probe.safetensors');"
            "l = m(input_ids=p['input_ids'], attention_mask=p['attention_mask']).logits;"
            "k = p['attention_mask'].bool(); print((l[k] - p['logits'][k]).abs().max().item())")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                         cwd="/", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-4


def test_multi_node_two_launchers_on_one_host_with_deepspeed(tmp_path):
    """Two `sft-scale train --nodes 2 --node-rank R` invocations, as two nodes would run them."""
    out, port = tmp_path / "mn", free_port()
    cmd = [sys.executable, "-m", "sft_scale.cli", "train", "--config", str(DEMO_CONFIG),
           "--zero", "2", "--nproc", "1", "--nodes", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "--output-dir", str(out)] + \
          [x for s in SMALL for x in ("--set", s)]
    procs = [subprocess.Popen(cmd + ["--node-rank", str(r)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "distributed: DEEPSPEED, world size 2" in logs[0]
    assert "--rdzv_backend static" in logs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_zero_auto_picks_a_stage_in_the_job_and_trains_under_deepspeed(tmp_path):
    """`--zero auto`: the launcher passes no DeepSpeed file; each rank plans from the memory it
    finds (here the host's RAM over 2 processes), all pick the same stage, DeepSpeed runs it."""
    out = tmp_path / "auto"
    cmd = [sys.executable, "-m", "sft_scale.cli", "train", "--config", str(DEMO_CONFIG),
           "--zero", "auto", "--nproc", "2", "--master-port", str(free_port()),
           "--output-dir", str(out)] + [x for s in SMALL for x in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    # ZeRO-0/1/2 move the same data; ZeRO-2 partitions the most, so it leaves the most headroom.
    assert "distributed.zero: auto -> ZeRO-2 (CPU memory / 2 process(es) on this node" in log
    assert "distributed: DEEPSPEED, world size 2" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 4
