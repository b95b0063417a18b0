"""Adding tokens: the embedding grows, LoRA trains and saves only the new rows, the adapter and
tokenizer reload with plain peft/transformers to the same logits, and merge resizes the base to
the saved tokenizer. (The fresh-process reload after a real run:
tests/e2e/test_tools_tokens_e2e.py.)"""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_scale.config import load_config
from sft_scale.errors import ConfigError
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.resolve import in_job_layout, resolve
from sft_scale.tools.merge import merge
from sft_scale.training.model import load_model, load_tokenizer

TEXT = "hello <calc> 2+2 <|act|> done"


def test_added_tokens_train_only_their_rows_and_reload_with_plain_peft(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model:\n  name_or_path: builtin:tiny-llama\n  add_tokens: ['<calc>']\n"
        "  add_special_tokens: ['<|act|>']\ndata:\n  train_files: [x.jsonl]\n  max_seq_len: 64\n")
    cfg = load_config(tmp_path / "c.yaml")
    tok = load_tokenizer(cfg)
    new = tok.convert_tokens_to_ids(["<calc>", "<|act|>"])
    assert new == [len(tok) - 2, len(tok) - 1]
    model = load_model(cfg, resolve(cfg, in_job_layout(cfg)))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # only LoRA and the new rows of embedding and (untied) LM head train
    extra = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert extra == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default",
                     "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta."
                     "default"]
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert set(new) <= set(ids[0].tolist())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    ad = tmp_path / "adapter"
    model.save_pretrained(ad, save_embedding_layers=False)
    tok.save_pretrained(ad)
    with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if "lora_" not in k}
    hidden = model.get_input_embeddings().weight.shape[1]
    assert sorted(shapes.values()) == [[2, hidden], [2, hidden]]  # two rows, not whole matrices

    # plain transformers + peft, nothing of ours: resize to the saved tokenizer, load
    tok2 = AutoTokenizer.from_pretrained(ad)
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"])
    base.resize_token_embeddings(len(tok2))
    reloaded = PeftModel.from_pretrained(base, str(ad)).eval()
    assert tok2(TEXT, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits[0] - ref).abs().max().item() < 1e-5

    report = merge(str(ad), str(tmp_path / "merged"))
    assert report["max_abs_logit_diff"] < 1e-4
    cfg_json = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg_json["vocab_size"] == len(tok)


def test_a_tokenizer_without_eos_is_a_config_error_naming_the_fix(tmp_path):
    base = resolve_model_path("builtin:tiny-llama")
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text((Path(base) / "tokenizer.json").read_text())
    settings = json.loads((Path(base) / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(dict(settings, eos_token=None)))
    (tmp_path / "c.yaml").write_text(
        f"model:\n  name_or_path: builtin:tiny-llama\n  tokenizer: {tokenizer}\n"
        "data:\n  train_files: [x.jsonl]\n")
    with pytest.raises(ConfigError, match=rf"tokenizer '{tokenizer}' has no EOS token: generation "
                                          r"could never stop\. .*or set model\.tokenizer"):
        load_tokenizer(load_config(tmp_path / "c.yaml"))


def _lora_grads(tmp_path, gc: bool):
    (tmp_path / f"gc{gc}.yaml").write_text(
        "model:\n  name_or_path: builtin:tiny-llama\ndata:\n  train_files: [x.jsonl]\n"
        f"  max_seq_len: 64\ntraining:\n  gradient_checkpointing: {str(gc).lower()}\n")
    cfg = load_config(tmp_path / f"gc{gc}.yaml")
    torch.manual_seed(0)
    model = load_model(cfg, resolve(cfg, in_job_layout(cfg)))
    for name, p in model.named_parameters():  # B starts at zero: give every grad a value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    seen = []
    model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(out.requires_grad))
    model.train()
    ids = torch.arange(3, 40).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    return seen, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_with_lora_leaves_the_embeddings_output_grad_free(tmp_path):
    """Non-reentrant checkpointing needs no grad-requiring input: the frozen embeddings' output
    stays grad-free (no first-layer input gradients are computed for nothing), and every LoRA
    gradient equals the run without checkpointing."""
    seen, grads = _lora_grads(tmp_path, gc=True)
    assert seen == [False]
    _, ref = _lora_grads(tmp_path, gc=False)
    assert grads.keys() == ref.keys() and all(g is not None for g in grads.values())
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], msg=n)
