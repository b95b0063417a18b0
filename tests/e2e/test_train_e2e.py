"""Real end-to-end runs of the recipe on the builtin tiny Llama, in fresh processes."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT, read_jsonl, run_train, train_metrics

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter that never imports sft_scale: plain transformers + peft only.
RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import PeftModel
    out, eight_bit = sys.argv[1], sys.argv[2] == "1"
    base = json.load(open(out + "/adapter/adapter_config.json"))["base_model_name_or_path"]
    kw = (dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
          if eight_bit else {})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kw)
    model = PeftModel.from_pretrained(model, out + "/adapter").eval()
    probe = load_file(out + "/probe.safetensors")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    m = probe["attention_mask"].bool()
    diff = (logits.float()[m] - probe["logits"][m]).abs().max().item()
    assert "sft_scale" not in sys.modules
    print(json.dumps({"max_abs_diff": diff}))
""")


def reload_diff(out, eight_bit=False) -> float:
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), "1" if eight_bit else "0"],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["max_abs_diff"]


def test_lora_run_loss_falls_and_adapter_reloads_with_plain_peft(tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, "training.max_steps=12", "training.logging_steps=1")
    metrics = train_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_memory_mb"):
        assert all(key in m for m in metrics)
    # per-step time and tokens/s describe the same interval; the demo packs (auto): no pad slots
    for m, prev in zip(metrics[1:], metrics, strict=False):
        assert m["step_time_s"] * m["tokens_per_s"] == pytest.approx(
            m["tokens_seen"] - prev["tokens_seen"], rel=1e-6)
    assert metrics[-1]["slots_seen"] == metrics[-1]["tokens_seen"]
    assert all(m["padding_efficiency"] == 1.0 for m in metrics)
    assert 100 < metrics[-1]["peak_memory_mb"] < 64_000  # the process's peak RSS on CPU
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 10_000
    assert (out / "adapter" / "tokenizer.json").exists()
    assert "global_batch_size: 16" in (out / "config.resolved.yaml").read_text()
    assert "global batch = 16 micro x 1 accumulation x 1 processes = 16" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["world_size"] == 1
    assert reload_diff(out) < 1e-4


def test_finished_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    run_train(out, "training.max_steps=2")
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    # the same command again (e.g. a requeued job) is a no-op
    proc = run_train(out, "training.max_steps=2")
    assert "already completed; nothing to do" in proc.stdout
    # another config into the same folder is refused
    proc = run_train(out, "training.max_steps=2", "training.learning_rate=1e-3", check=False)
    assert proc.returncode == 2
    assert "already holds a finished run of another config" in proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_8bit_lora_with_gradient_checkpointing(tmp_path):
    out = tmp_path / "run8"
    proc = run_train(out, "quantization.load_in_8bit=true", "training.gradient_checkpointing=true",
                     "training.max_steps=12")
    assert "Linear8bitLt layers" in proc.stderr
    metrics = train_metrics(out)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    # Reloaded onto an 8-bit base in a fresh process, the adapter gives training's final logits.
    assert reload_diff(out, eight_bit=True) < 1e-3


def test_full_finetune_saves_a_plain_transformers_model(tmp_path):
    out = tmp_path / "full"
    run_train(out, "lora.enabled=false", "training.max_steps=4", "training.learning_rate=1e-3")
    assert (out / "model" / "model.safetensors").exists()
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(type(m).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(out / "model")], capture_output=True,
                          text=True, cwd="/")
    assert proc.stdout.strip() == "LlamaForCausalLM", proc.stderr[-2000:]


def test_two_processes_get_different_examples_and_match_accumulation(tmp_path):
    two = tmp_path / "two"
    proc = run_train(two, "training.max_steps=4", "training.micro_batch_size=4",
                     "output.trace_samples=true", nproc=2)
    assert "world size 2" in proc.stderr
    ranks = [read_jsonl(two / "data_trace" / f"rank{r}.jsonl") for r in (0, 1)]
    for s0, s1 in zip(*ranks, strict=True):
        assert s0["step"] == s1["step"]
        assert not set(s0["examples"][0]) & set(s1["examples"][0]), "ranks shared an example"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8

    # The same global batch as 1 process x 2 accumulation steps: the same losses.
    one = tmp_path / "one"
    run_train(one, "training.max_steps=4", "training.micro_batch_size=4",
              "training.gradient_accumulation_steps=2")
    l2 = [m["loss"] for m in train_metrics(two)]
    l1 = [m["loss"] for m in train_metrics(one)]
    assert l1 == pytest.approx(l2, rel=1e-4)


def test_sft_scale_demo_shows_a_clear_gain(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sft_scale.cli", "demo", "--output-dir",
                           str(tmp_path / "demo")], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "=== demo: held-out sentiment labelling" in proc.stdout
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["before"] <= 0.1 and report["after"] >= 0.9
