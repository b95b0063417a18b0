"""Train -> save -> serve for five real model families (tests/families.py): LoRA SFT on a short
chat task, merge, then plain transformers in a fresh process that never imports sft_scale renders
exactly what training saw, with the saved chat template, and stops generating at the template's
end-of-turn token."""

import json

import pytest
import yaml

from sft_scale.data import encode_example
from tests.e2e.test_merge_export_e2e import cli, plain
from tests.families import FAMILIES, FAMILY
from tests.helpers import run_train

pytestmark = pytest.mark.slow

SYSTEM = "Answer with the colour only."
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey"]


def conversation(i: int, family: str) -> list[dict]:
    msgs = [{"role": "user", "content": f"Item {i}: what colour is it?"},
            {"role": "assistant", "content": "Blue."}]
    if i % 2:
        msgs = [{"role": "user", "content": f"Pick any colour but {COLOURS[i % 8]}."},
                {"role": "assistant", "content": "Blue."}] + msgs
    if i % 3 == 0 and family != "gemma2":  # Gemma-2's template refuses system turns
        msgs = [{"role": "system", "content": SYSTEM}] + msgs
    return msgs


SERVE = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
conv, results = json.loads(sys.argv[1]), {}
for folder in map(Path, sys.argv[2:]):
    tok = AutoTokenizer.from_pretrained(folder)
    full = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    res = results[folder.name] = {
        "full": list(full), "padding_side": tok.padding_side,
        "plain_bos": tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id}
    if (folder / "config.json").exists():
        prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        res["eos"] = model.generation_config.eos_token_id
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        res["generated"] = out[0, prompt["input_ids"].shape[1]:].tolist()
        res["text"] = tok.decode(res["generated"])
print(json.dumps(results))
"""


def config(tmp_path, family: str, base) -> tuple:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(i, family)}) + "\n"
                            for i in range(32)))
    cfg = {"model": {"name_or_path": str(base), "dtype": "fp32"},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
           "data": {"train_files": [str(data)], "chat_template": "tokenizer",
                    "max_seq_len": 256, "eval_fraction": 0.125},
           "training": {"seed": 0, "micro_batch_size": 8, "max_steps": 16,
                        "learning_rate": 2e-2, "warmup_steps": 0, "lr_scheduler": "constant",
                        "logging_steps": 4},
           "quantization": {"load_in_8bit": family == "mistral"},
           "logging": {"plot": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, data


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_merges_and_serves_as_trained(family, family_model, tmp_path):
    from transformers import AutoTokenizer

    base = family_model(family)
    cfg, _ = config(tmp_path, family, base)
    out = tmp_path / "run"
    proc = run_train(out, config=cfg)
    summary = json.loads((out / "summary.json").read_text())
    print(f"{family}: packing {summary['fast_paths']['packing']} "
          f"({summary['fast_paths']['packing_reason']}); loss {summary['first_loss']:.3f} -> "
          f"{summary['final_loss']:.3f}")
    assert summary["final_loss"] < summary["first_loss"]
    if family == "mistral":
        assert "Linear8bitLt" in proc.stderr

    merged = tmp_path / "merged"
    cli("merge", "--adapter", out / "adapter", "--out", merged)
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["tokenizer_matches_base"]
    fam = FAMILY[family]
    if fam.sentencepiece:  # the base's SentencePiece model, byte for byte
        for d in (out / "adapter", merged):
            assert (d / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    cfg_json = json.loads((merged / "config.json").read_text())
    assert cfg_json["rope_theta"] == cfg_json["rope_parameters"]["rope_theta"]

    # What training saw for a held-out conversation, through sft_scale's own encoding.
    base_tok = AutoTokenizer.from_pretrained(base)
    conv = conversation(7, family) if family != "gemma2" else conversation(5, family)
    conv = [dict(m, content="Blue.") if m["role"] == "assistant" else m for m in conv]
    trained = encode_example(base_tok, {"kind": "chat", "messages": [
        dict(m, train=m["role"] == "assistant") for m in conv]}, 4096, base_tok.chat_template)
    eot = base_tok.convert_tokens_to_ids(fam.end_of_turn)
    served = plain(SERVE, json.dumps(conv), out / "adapter", merged)
    for res in served.values():
        assert res["full"] == trained["input_ids"]
        assert res["padding_side"] == "right"
        assert res["plain_bos"] == (trained["input_ids"][0] == base_tok.bos_token_id)
    res = served["merged"]
    for name in ("adapter", "best_adapter"):
        for f in ("generation_config.json", "chat_template.jinja"):
            assert (out / name / f).is_file(), (name, f)
    assert (out / "best_adapter" / "chat_template.jinja").read_text() == base_tok.chat_template
    # The merged model stops where the trained answers stop: at the end-of-turn token.
    assert eot in (res["eos"] if isinstance(res["eos"], list) else [res["eos"]])
    assert res["generated"][-1] == eot and len(res["generated"]) < 24, res["text"]
