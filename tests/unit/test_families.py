"""Exact loss masks under five real tokenizers and their official chat templates
(tests/families.py), checked against the templates' own `{% generation %}` markers through
transformers' `return_assistant_tokens_mask`, an implementation independent of ours."""

import pytest

from sft_scale.data import encode_example
from sft_scale.data.templates import end_of_turn_tokens, render
from sft_scale.data.tokenize import IGNORE_INDEX
from tests.families import FAMILIES, FAMILY, load_tokenizer

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris."}],
    "multi_turn": [{"role": "user", "content": "Count with me: one"},
                   {"role": "assistant", "content": "two"},
                   {"role": "user", "content": "three"},
                   {"role": "assistant", "content": "four, and then five!"}],
    "system": [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "Colour of the sky?"},
               {"role": "assistant", "content": "Blue"},
               {"role": "user", "content": "And grass?"},
               {"role": "assistant", "content": "Green"}],
    "train_false": [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "an answer we do not want", "train": False},
                    {"role": "user", "content": "try again"},
                    {"role": "assistant", "content": "a better answer"}],
}
# Gemma-2's template refuses a system role (raise_exception), as the real one does.
CASES = [(f, c) for f in FAMILIES for c in CONVERSATIONS if not (f == "gemma2" and c == "system")]

# What each template renders for the multi-turn conversation: the format each family's authors
# publish, written out independently of tests/chat_templates.py.
RENDERED = {
    "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
             "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
             "<|end_header_id|>\n\nCount with me: one<|eot_id|><|start_header_id|>assistant"
             "<|end_header_id|>\n\ntwo<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
             "three<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nfour, and then "
             "five!<|eot_id|>",
    "mistral": "<s>[INST] Count with me: one[/INST] two</s>[INST] three[/INST] four, and then "
               "five!</s>",
    "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
             "assistant.<|im_end|>\n<|im_start|>user\nCount with me: one<|im_end|>\n"
             "<|im_start|>assistant\ntwo<|im_end|>\n<|im_start|>user\nthree<|im_end|>\n"
             "<|im_start|>assistant\nfour, and then five!<|im_end|>\n",
    "gemma2": "<s><start_of_turn>user\nCount with me: one<end_of_turn>\n<start_of_turn>model\n"
              "two<end_of_turn>\n<start_of_turn>user\nthree<end_of_turn>\n<start_of_turn>model\n"
              "four, and then five!<end_of_turn>\n",
    "phi3": "<|user|>\nCount with me: one<|end|>\n<|assistant|>\ntwo<|end|>\n<|user|>\nthree"
            "<|end|>\n<|assistant|>\nfour, and then five!<|end|>\n<|endoftext|>",
}


@pytest.fixture(scope="module")
def tokenizers():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_tokenizer(name)
        return cache[name]
    return get


def encode(tok, messages):
    msgs = [dict(m, train=m.get("train", m["role"] == "assistant")) for m in messages]
    return encode_example(tok, {"kind": "chat", "messages": msgs}, 4096, tok.chat_template)


def runs(ids, mask):
    out, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_template_renders_the_family_format(tokenizers, family):
    tok = tokenizers(family)
    assert tok.apply_chat_template(CONVERSATIONS["multi_turn"], tokenize=False) == \
        RENDERED[family]


@pytest.mark.parametrize("family,conversation", CASES)
def test_trained_tokens_are_each_answer_and_its_end_of_turn_token(tokenizers, family,
                                                                  conversation):
    tok = tokenizers(family)
    messages = CONVERSATIONS[conversation]
    enc = encode(tok, messages)
    ref = tok.apply_chat_template([{k: v for k, v in m.items() if k != "train"}
                                   for m in messages], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    # The sequence is exactly what the template renders: no EOS inserted after a turn that the
    # template closes with its own end-of-turn token, BOS only where the template writes it.
    assert enc["input_ids"] == ref["input_ids"]
    trained = [lab != IGNORE_INDEX for lab in enc["labels"]]
    assert all(lab == t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True)
               if lab != IGNORE_INDEX)
    answers = [m for m in messages if m["role"] == "assistant"]
    ref_runs = runs(ref["input_ids"], ref["assistant_masks"])
    assert len(ref_runs) == len(answers)
    expected = [r for r, m in zip(ref_runs, answers, strict=True) if m.get("train", True)]
    assert runs(enc["input_ids"], trained) == expected
    # ... and independently of the markers: each run decodes to the answer + end-of-turn token.
    eot = FAMILY[family].end_of_turn
    assert [tok.decode(r).strip() for r in runs(enc["input_ids"], trained)] == \
        [m["content"] + eot for m in answers if m.get("train", True)]


def starts_with_bos(tokenizer, template: str) -> bool:
    """Whether conversations rendered by `template` begin with the tokenizer's BOS token."""
    if tokenizer.bos_token is None:
        return False
    try:
        text = render(tokenizer, template, [{"role": "user", "content": "Hi"}], True)
    except Exception:
        return False
    return text.startswith(tokenizer.bos_token)


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_token_and_bos_are_read_from_the_template(tokenizers, family):
    tok = tokenizers(family)
    assert end_of_turn_tokens(tok, tok.chat_template) == [FAMILY[family].end_of_turn]
    assert starts_with_bos(tok, tok.chat_template) == (family in ("llama", "mistral", "gemma2"))


def test_mistral_system_prompt_moves_to_the_last_user_turn_and_masks_still_hold(tokenizers):
    # The template is not incremental: rendering the first turn alone puts the system prompt
    # elsewhere than the full conversation does. Masks come from the full rendering.
    tok = tokenizers("mistral")
    text = tok.apply_chat_template(CONVERSATIONS["system"], tokenize=False)
    assert text == ("<s>[INST] Colour of the sky?[/INST] Blue</s>[INST] You answer in one word."
                    "\n\nAnd grass?[/INST] Green</s>")


def test_phi3_trains_end_not_the_eos_its_template_appends_at_the_end(tokenizers):
    tok = tokenizers("phi3")
    enc = encode(tok, CONVERSATIONS["single"])
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["labels"][-1] == IGNORE_INDEX
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]).strip() == "Paris.<|end|>"
