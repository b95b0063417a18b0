"""A tool-call chat (LLaMA-Factory's function_call/observation shape) trains with an added special
token, and the adapter + tokenizer (as saved, and as exported from the last checkpoint) reload in
a fresh process with plain transformers/peft to the logits training ended with."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sft_scale.tools.export import export
from tests.helpers import ROOT, run_train, train_metrics

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
RELOAD = """
import json, sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
ad = sys.argv[1]
tok = AutoTokenizer.from_pretrained(ad)
base = AutoModelForCausalLM.from_pretrained(
    json.load(open(ad + "/adapter_config.json"))["base_model_name_or_path"])
base.resize_token_embeddings(len(tok))
model = PeftModel.from_pretrained(base, ad).eval()
p = load_file(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=p["input_ids"], attention_mask=p["attention_mask"]).logits
m = p["attention_mask"].bool()
print(json.dumps({"diff": (logits[m] - p["logits"][m]).abs().max().item(),
                  "act": tok.convert_tokens_to_ids("<|act|>"), "n": len(tok)}))
"""


@pytest.mark.slow
def test_tool_call_chat_with_an_added_token_trains_and_reloads(tmp_path):
    rows = json.loads((FIXTURES / "glaive_toolcall_sample.json").read_text())
    rows[0]["conversations"][-1]["value"] = "<|act|> It is 18 degrees and clear in Paris."
    (tmp_path / "tools.json").write_text(json.dumps(rows * 8))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  name_or_path: builtin:tiny-llama\n  add_special_tokens: ['<|act|>']\n"
                   "data:\n  train_files: [tools.json]\n  max_seq_len: 256\n"
                   "  truncation: proportional\n  chat_template: chatml\n"
                   "training:\n  micro_batch_size: 4\n  max_steps: 4\n  learning_rate: 3.0e-3\n"
                   "  logging_steps: 1\n")
    out = tmp_path / "run"
    proc = run_train(out, config=cfg)
    assert "training 1 added token rows in 2 matrices (peft trainable_token_indices)" \
        in proc.stdout + proc.stderr
    assert len(train_metrics(out)) == 4
    # export rebuilds the adapter from the last checkpoint: the resized skeleton names the rows
    exported = export(str(out), str(tmp_path / "export"))
    a, b = load_file(str(out / "adapter" / "adapter_model.safetensors")), \
        load_file(str(exported / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("trainable_tokens" in k for k in a)
    assert all((a[k] - b[k]).abs().max().item() == 0 for k in a)
    for adapter in (out / "adapter", exported):
        proc = subprocess.run([sys.executable, "-c", RELOAD, str(adapter),
                               str(out / "probe.safetensors")], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["diff"] < 1e-4 and res["act"] == res["n"] - 1
