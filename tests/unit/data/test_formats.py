"""Exact loss masks for every format, under two chat templates written here."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_scale.config import load_config
from sft_scale.data import DataError, build_datasets, collate_packed, encode_example
from sft_scale.data.formats import detect_format, to_example
from sft_scale.data.tokenize import IGNORE_INDEX
from sft_scale.model_source import resolve_model_path

# Two templates of different families, written out here (not taken from the code under test).
CHATML_TEST = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEST = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
               "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
               "{% endif %}")
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
TEMPLATES = {"chatml": CHATML_TEST, "llama3": LLAMA3_TEST}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


def trained_runs(tok, enc) -> list[str]:
    """Each contiguous run of trained tokens, decoded."""
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def encode(tok, rec, fmt, template="chatml", **kw):
    rec = dict(rec, _source="test.jsonl:1")
    return encode_example(tok, to_example(rec, fmt), 512, TEMPLATES[template], **kw)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_alpaca_trains_only_the_output(tok, template):
    rec = {"instruction": "Name a colour.", "input": "Not red.", "output": "Blue is one.",
           "system": "Be brief."}
    enc = encode(tok, rec, "alpaca", template)
    assert trained_runs(tok, enc) == ["Blue is one." + END[template] + tok.eos_token]
    text = tok.decode(enc["input_ids"])
    assert "Be brief." in text and "Name a colour.\n\nNot red." in text


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_multi_turn_messages_train_every_assistant_turn_except_train_false(tok, template):
    rec = {"messages": [
        {"role": "system", "content": "You count."},
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"}, {"role": "assistant", "content": "four",
                                               "train": False},
        {"role": "user", "content": "five"}, {"role": "assistant", "content": "six"}]}
    enc = encode(tok, rec, "messages", template)
    e = END[template] + tok.eos_token
    assert trained_runs(tok, enc) == ["two" + e, "six" + e]
    # the untrained assistant turn is still in the input, followed by EOS like the others
    assert "four" + e in tok.decode(enc["input_ids"])


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_sharegpt(tok, template):
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                             {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]}
    enc = encode(tok, rec, "sharegpt", template)
    e = END[template] + tok.eos_token
    assert trained_runs(tok, enc) == ["hello" + e, "ciao" + e]


def test_prompt_completion_text_and_classification(tok):
    enc = encode(tok, {"prompt": "2+2=", "completion": " 4"}, "prompt_completion")
    assert trained_runs(tok, enc) == [" 4" + tok.eos_token]
    enc = encode(tok, {"text": "the soup was great"}, "text")
    assert trained_runs(tok, enc) == ["the soup was great" + tok.eos_token]  # all but BOS
    enc = encode(tok, {"text": "the soup was great", "label": "positive"}, "classification")
    assert trained_runs(tok, enc) == [" positive" + tok.eos_token]


def test_train_on_inputs_trains_everything_after_the_first_token(tok):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    enc = encode(tok, rec, "messages", train_on_inputs=True)
    assert enc["labels"][0] == IGNORE_INDEX
    assert enc["labels"][1:] == enc["input_ids"][1:]


def test_no_extra_eos_when_the_turn_marker_is_eos(tok):
    t = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.eos_token = "<|im_end|>"
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    enc = encode(t, rec, "messages")
    assert trained_runs(t, enc) == ["yo<|im_end|>"]
    assert enc["input_ids"].count(t.eos_token_id) == 2  # one per turn, none appended


def test_detect_format():
    assert detect_format(["messages"], "x") == "messages"
    assert detect_format(["conversations", "id"], "x") == "sharegpt"
    assert detect_format(["instruction", "input", "output"], "x") == "alpaca"
    assert detect_format(["prompt", "completion"], "x") == "prompt_completion"
    assert detect_format(["prompt", "answer"], "x") == "prompt_completion"
    assert detect_format(["text", "label"], "x") == "classification"
    assert detect_format(["text"], "x") == "text"
    with pytest.raises(DataError,
                       match=r"f.jsonl: cannot tell the format from the fields \['foo'\]"):
        detect_format(["foo"], "f.jsonl")


def test_packed_row_loss_equals_each_example_alone(tok):
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"),
                                                 dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    exs = [encode(tok, {"prompt": p, "completion": c}, "prompt_completion")
           for p, c in [("Review: the soup was awful\nSentiment:", " negative"),
                        ("Hello there, how are you doing today?", " fine thanks"),
                        ("x", " y z")]]
    exs = [dict(e, labels=e["input_ids"]) for e in exs]  # score every token, not only answers

    def token_losses(input_ids, labels, **kw):
        logits = model(input_ids=input_ids, use_cache=False, **kw).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="none",
                                                 ignore_index=IGNORE_INDEX)

    alone = [token_losses(torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]))
             for e in exs]
    packed = collate_packed(exs)
    assert "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == sum([list(range(len(e["input_ids"])))
                                                       for e in exs], [])
    got = token_losses(packed["input_ids"], packed["labels"], position_ids=packed["position_ids"])
    start = 0
    for e, ref in zip(exs, alone, strict=True):
        n = len(e["input_ids"])
        # positions start..start+n-2 predict the example's own tokens 1..n-1
        torch.testing.assert_close(got[start:start + n - 1], ref, atol=1e-5, rtol=1e-5)
        start += n
    # the boundary position (predicting the next example's first token) is ignored
    assert packed["labels"][0, len(exs[0]["input_ids"])] == IGNORE_INDEX


def write_cfg(tmp_path, data_yaml: str, extra: str = ""):
    p = tmp_path / "cfg.yaml"
    p.write_text("model:\n  name_or_path: builtin:tiny-llama\ndata:\n" + data_yaml + extra)
    return load_config(p)


def test_sources_of_every_kind_and_mixing(tmp_path, tok):
    import datasets
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "c.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list([{"text": f"t{i}"} for i in range(4)]).save_to_disk(
        str(tmp_path / "e"))
    cfg = write_cfg(tmp_path, "  datasets:\n"
                    "    - {path: a.jsonl}\n    - {path: b.json, count: 3}\n"
                    "    - {path: c.csv, weight: 0.5}\n    - {path: d.parquet, weight: 2.0}\n"
                    "    - {path: e}\n  eval_fraction: 0.1\n")
    train, ev, stats = build_datasets(cfg, tok)
    assert len(train) + len(ev) == 10 + 3 + 5 + 20 + 4
    assert len(ev) == 4 and stats.eval_examples == 4
    sources = [s.split("/")[-1].split(":")[0].split("[")[0]
               for s in list(train["_source"]) + list(ev["_source"])]
    assert sorted(set(sources)) == ["a.jsonl", "b.json", "c.csv", "d.parquet", "e"]
    assert sources.count("d.parquet") == 20 and sources.count("b.json") == 3
    # seeded: the same config gives the same order
    train2, _, _ = build_datasets(cfg, tok)
    assert list(train["_source"]) == list(train2["_source"])


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n',
     r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 7}\n',
     r"d.jsonl:2: record does not fit format 'prompt_completion'"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n',
     r"d.jsonl:1: the conversation has no assistant turn"),
    ('{"prompt": "a", "completion": "b"}\n{"instruction": "x", "output": "y"}\n',
     r"d.jsonl:2: this record's fields \['instruction', 'output'\] share nothing with line 1"),
    ("\n\n", r"d.jsonl: the file holds no records"),
])
def test_bad_data_errors_name_the_record(tmp_path, tok, content, expected):
    (tmp_path / "d.jsonl").write_text(content)
    cfg = write_cfg(tmp_path, "  train_files: [d.jsonl]\n")
    with pytest.raises(DataError, match=expected):
        build_datasets(cfg, tok)


def test_alpaca_record_missing_output_names_format_and_fields(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    cfg = write_cfg(tmp_path, "  train_files: [d.jsonl]\n")
    with pytest.raises(DataError,
                       match=r"d.jsonl:3|d.jsonl:2: record does not fit format 'alpaca': "
                             r"fields \['output'\] missing"):
        build_datasets(cfg, tok)


def test_length_policy_counts_truncated_and_dropped(tmp_path, tok):
    rows = [{"prompt": "word " * 40, "completion": " yes"},          # answer cut away -> dropped
            {"prompt": "short", "completion": " a long answer " * 10},  # truncated, kept
            {"prompt": "ok", "completion": " fine"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_cfg(tmp_path, "  train_files: [d.jsonl]\n  max_seq_len: 16\n")
    train, _, stats = build_datasets(cfg, tok)
    assert stats.truncated == 2 and stats.dropped_no_trainable == 1 and len(train) == 2
    assert max(train["length"]) == 16
    cfg = write_cfg(tmp_path, "  train_files: [d.jsonl]\n  max_seq_len: 16\n  truncation: drop\n")
    train, _, stats = build_datasets(cfg, tok)
    assert stats.dropped_too_long == 2 and len(train) == 1
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(DataError, match="training data is empty after filtering"):
        build_datasets(cfg, tok)
