"""Merge and export through the real CLI; outputs loaded by plain transformers/peft in processes
that never import sft_scale."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, run_train

pytestmark = pytest.mark.slow

SMALL = ("training.max_steps=4", "training.micro_batch_size=4", "training.warmup_steps=0")


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "sft_scale.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def plain(code: str, *args) -> dict:
    """Run `code` in a fresh interpreter without sft_scale; it prints one JSON line."""
    code = textwrap.dedent(code) + "\nassert 'sft_scale' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


COMPARE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
merged_dir, adapter_dir = sys.argv[1], sys.argv[2]
base = json.load(open(adapter_dir + "/adapter_config.json"))["base_model_name_or_path"]
tok = AutoTokenizer.from_pretrained(merged_dir)
x = tok(["Review: the pasta was lovely\\nSentiment:"], return_tensors="pt")
merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                adapter_dir).eval()
with torch.no_grad():
    d = (merged(**x).logits - ref(**x).logits).abs().max().item()
print(json.dumps({"diff": d}))
"""


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "run8"
    run_train(out, *SMALL, "quantization.load_in_8bit=true", "training.max_steps=8")
    return out


def test_merge_after_8bit_training_matches_base_plus_adapter_and_shards(run8, tmp_path):
    out = tmp_path / "merged"
    res = cli("merge", "--adapter", run8 / "adapter", "--out", out, "--dtype", "fp32",
              "--max-shard-size", "150KB")
    assert "greedy generations equal: True" in res.stdout
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert "base:" in card and "final training loss" in card and "training data" in card
    report = json.loads((out / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] < 1e-4
    # merged (fp32 base, never int8) == fp32 base + adapter, loaded by plain libraries
    assert plain(COMPARE, out, run8 / "adapter")["diff"] < 1e-4


def test_merge_refuses_bad_input_and_writes_nothing(run8, tmp_path):
    # an adapter for another base: a tiny Llama of another width
    other = tmp_path / "other_base"
    plain("""
        import sys, json, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        m = LlamaForCausalLM(LlamaConfig(vocab_size=499, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
        m.save_pretrained(sys.argv[1]); print(json.dumps({}))""", other)
    out = tmp_path / "never"
    res = cli("merge", "--adapter", run8 / "adapter", "--out", out, "--base", other, check=False)
    assert res.returncode == 2
    assert f"adapter {run8 / 'adapter'} does not fit base {other}" in res.stderr
    assert not out.exists()
    res = cli("merge", "--adapter", tmp_path, "--out", out, check=False)
    assert res.returncode == 2
    assert "missing ['adapter_config.json', 'adapter_model.safetensors']" in res.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    res = cli("merge", "--adapter", run8 / "adapter", "--out", busy, check=False)
    assert res.returncode == 2 and "is not empty; pass --overwrite" in res.stderr
    assert (busy / "keep.txt").read_text() == "mine"


def test_too_little_disk_is_refused_before_writing(run8, tmp_path, monkeypatch):
    from collections import namedtuple

    from sft_scale.tools import merge as m
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(m.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(m.ConfigError, match="not enough disk for the merged model"):
        m.merge(str(run8 / "adapter"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def ds_run(tmp_path, stage, *extra):
    out = tmp_path / stage
    run_train(out, *SMALL, *extra, nproc=2, extra_launch=[
        "--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / f"{stage}.json")])
    return out


def test_zero3_export_equals_zero2_export_and_loads_with_plain_peft(tmp_path):
    exports = {}
    for stage in ("zero2", "zero3"):
        run = ds_run(tmp_path, stage)
        exports[stage] = tmp_path / f"export-{stage}"
        cli("export", "--run", run, "--out", exports[stage])
        # the export equals the adapter the run itself saved at the end
        a = load_file(str(exports[stage] / "adapter_model.safetensors"))
        b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    a2 = load_file(str(exports["zero2"] / "adapter_model.safetensors"))
    a3 = load_file(str(exports["zero3"] / "adapter_model.safetensors"))
    for k in a2:
        torch.testing.assert_close(a3[k], a2[k], rtol=1e-4, atol=1e-5)
    loaded = plain("""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        d = sys.argv[1]
        base = json.load(open(d + "/adapter_config.json"))["base_model_name_or_path"]
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), d)
        print(json.dumps({"type": type(m).__name__}))""", exports["zero3"])
    assert loaded["type"] == "PeftModelForCausalLM"


def test_full_finetune_zero3_checkpoint_exports_a_consolidated_model(tmp_path):
    run = ds_run(tmp_path, "zero3", "lora.enabled=false", "training.learning_rate=1e-4")
    out = tmp_path / "full-export"
    cli("export", "--run", run, "--out", out)
    check = plain("""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        a = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        b = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
        x = torch.tensor([[1, 50, 60, 70, 80, 90]])
        with torch.no_grad():
            d = (a(input_ids=x).logits - b(input_ids=x).logits).abs().max().item()
        print(json.dumps({"diff": d}))""", out, run / "model")
    # the export of the final ZeRO-3 checkpoint equals the consolidated model the run saved
    assert check["diff"] < 1e-5
