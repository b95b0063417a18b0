"""What a saved model carries for serving (sft_scale/training/serving.py), on real tokenizers."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from sft_scale.data.templates import CHATML, fallback_warning
from sft_scale.model_source import resolve_model_path
from sft_scale.training.serving import adds_bos, for_training, save_tokenizer, serving_tokenizer
from tests.families import build_family, tokenizer_folder
from tests.helpers import ROOT


def test_saved_tokenizer_adds_bos_as_training_did_and_reloads_right_padded(tmp_path):
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    assert not adds_bos(tok)  # the demo trains completions with BOS first: the case
    tok.padding_side = "left"
    tok(["a", "a b c"], padding=True)  # bakes left padding into the backend, as merge's probe did
    serving_tokenizer(tok, CHATML, True).save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert adds_bos(again) and again.padding_side == "right"
    assert again.chat_template == CHATML


def test_saved_sentencepiece_tokenizer_reloads_right_padded(tmp_path):
    # LlamaTokenizer (transformers 5) defaults to left padding, and save_pretrained does not
    # write padding_side: it must be written explicitly.
    tok = AutoTokenizer.from_pretrained(tokenizer_folder("gemma2"))
    assert type(tok).__name__ == "LlamaTokenizer"
    save_tokenizer(serving_tokenizer(tok, None, None), tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "right"


def test_generation_config_stops_at_the_templates_end_of_turn(tmp_path):
    base = build_family("qwen2", tmp_path)
    tok = AutoTokenizer.from_pretrained(base)
    serving = for_training(tok, str(base), tok.chat_template, False)
    assert serving.generation_config.eos_token_id == [
        tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    serving.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())[
        "eos_token_id"] == serving.generation_config.eos_token_id


def test_chatml_fallback_is_announced():
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    msg = fallback_warning(tok, "auto")
    assert "no chat template" in msg and "plain text" in msg
    assert fallback_warning(tok, "chatml") is None


@pytest.mark.parametrize("has_sentencepiece", [False, True])
def test_sentencepiece_only_tokenizer(tmp_path, has_sentencepiece):
    # A base that ships only tokenizer.model (no tokenizer.json), loaded in a fresh process
    # where sentencepiece is importable or not.
    (tmp_path / "tokenizer.model").write_bytes(
        (tokenizer_folder("mistral") / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}))
    block = "" if has_sentencepiece else "sys.modules['sentencepiece'] = None\n"
    code = (f"import sys\n{block}from sft_scale.training.model import open_tokenizer\n"
            f"print(len(open_tokenizer(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    if has_sentencepiece:
        assert proc.returncode == 0 and proc.stdout.split()[-1] == "32768", proc.stderr[-2000:]
    else:
        assert "the sentencepiece package is not installed" in proc.stderr, proc.stderr[-2000:]
        assert "tiktoken" not in proc.stderr.splitlines()[-1]
