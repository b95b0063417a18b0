"""Real chat dataset shapes: tool definitions, tool calls and results (OpenAI and LLaMA-Factory),
content parts, loss_weight, and the silently-wrong cases of labels, truncation, duplicates."""

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig

from sft_scale.config import ConfigError, load_config
from sft_scale.data import DataError, build_datasets, encode_example
from sft_scale.data.formats import to_example
from sft_scale.data.tokenize import IGNORE_INDEX
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.resolve import resolve_fast_paths

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"
# A Llama-3.1-style tool template written here (not the code under test): calls as JSON with
# "parameters", results in an "ipython" turn.
TOOL_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>"
    "{% if m['role'] == 'tool' %}ipython{% else %}{{ m['role'] }}{% endif %}<|end_header_id|>\n\n"
    "{% if tools and loop.first %}Tools: {% for t in tools %}{{ t['function']['name'] }} "
    "{% endfor %}\n{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}"
    "{\"name\": \"{{ c['function']['name'] }}\", "
    "\"parameters\": {{ c['function']['arguments'] | tojson }}}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


def runs(tok, enc, trained=True) -> list[str]:
    """Each contiguous run of trained (or untrained) tokens, decoded."""
    out, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if (lab != IGNORE_INDEX) == trained:
            cur.append(t)
        elif cur:
            out, cur = out + [tok.decode(cur)], []
    return out + ([tok.decode(cur)] if cur else [])


def records(path: Path) -> list[dict]:
    text = path.read_text()
    rows = (json.loads(text) if path.suffix == ".json"
            else [json.loads(x) for x in text.splitlines()])
    return [dict(r, _source=f"{path.name}:{i + 1}") for i, r in enumerate(rows)]


def cfg_for(tmp_path, data_yaml: str, extra: str = ""):
    p = tmp_path / "cfg.yaml"
    p.write_text("model:\n  name_or_path: builtin:tiny-llama\ndata:\n" + data_yaml + extra)
    return load_config(p)


@pytest.mark.parametrize("template", ["chatml", "llama31_style"])
def test_llamafactory_function_call_and_observation_turns(tok, template):
    from sft_scale.data.templates import CHATML
    rec = records(FIXTURES / "glaive_toolcall_sample.json")[0]
    ex = to_example(rec, "sharegpt")
    assert ex["tools"][0]["function"]["name"] == "get_weather"
    assert ex["messages"][1]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": {"city": "Paris"}}
    enc = encode_example(tok, ex, 4096, CHATML if template == "chatml" else TOOL_TEMPLATE)
    trained, text = runs(tok, enc), tok.decode(enc["input_ids"])
    call = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '<|im_end|>' if template == "chatml"
            else '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>')
    assert trained[0].startswith(call)  # the call is assistant output: trained
    assert trained[-1].startswith("It is 18 degrees and clear in Paris.")
    assert len(trained) == 2
    # the tool result and the tool definitions are in the text, never trained
    assert '"temperature": 18' in text and not any("temperature" in r for r in trained)
    assert "get_weather" in runs(tok, enc, trained=False)[0]


@pytest.mark.parametrize("family, call, end", [
    ("llama", '{"name": "get_weather", "parameters": {"city": "%s"}}', "<|eot_id|>"),
    ("qwen2", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>',
     "<|im_end|>"),
])
def test_tool_calls_under_the_official_llama31_and_qwen25_templates(family, call, end):
    from tests.families import load_tokenizer
    ftok = load_tokenizer(family)
    for path, city, answer in [("glaive_toolcall_sample.json", "Paris",
                                "It is 18 degrees and clear in Paris."),
                               ("openai_tools_sample.jsonl", "Oslo", "3 degrees in Oslo.")]:
        rec = records(FIXTURES / path)[0]
        ex = to_example(rec, "sharegpt" if path.endswith(".json") else "messages")
        enc = encode_example(ftok, ex, 4096, ftok.chat_template)
        # exactly the call and the answer, each with the template's end-of-turn token
        assert runs(ftok, enc) == [call % city + end, answer + end]


def test_openai_tool_calls_content_parts_and_loss_weight(tok):
    from sft_scale.data.templates import CHATML
    rec, plain = records(FIXTURES / "openai_tools_sample.jsonl")
    ex = to_example(rec, "messages")
    assert ex["messages"][0]["content"] == "You answer briefly."
    assert ex["messages"][1]["content"] == "Weather in Oslo?"  # text parts joined
    # an assistant turn with empty content and tool_calls trains the call, not just the marker
    enc = encode_example(tok, ex, 4096, CHATML)
    trained = runs(tok, enc)
    assert trained[0].startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                                 '"Oslo"}}\n</tool_call><|im_end|>')
    assert trained[1].startswith("3 degrees in Oslo.")
    enc = encode_example(tok, to_example(rec, "messages", train_tool_calls=False), 4096, CHATML)
    assert len(runs(tok, enc)) == 1 and runs(tok, enc)[0].startswith("3 degrees")
    # loss_weight 0 / 1 per message
    enc = encode_example(tok, to_example(plain, "messages"), 4096, CHATML)
    assert [r.split("<|im_end|>")[0] for r in runs(tok, enc)] == ["hi again"]


def test_template_without_tool_support_is_refused_naming_the_record(tmp_path, tok):
    (tmp_path / "d.json").write_text((FIXTURES / "glaive_toolcall_sample.json").read_text())
    cfg = cfg_for(tmp_path, "  train_files: [d.json]\n  max_seq_len: 4096\n  chat_template: "
                  + json.dumps(PLAIN_TEMPLATE) + "\n")
    with pytest.raises(DataError, match=r"d.json\[[01]\]: the chat template does not render "
                                        r"tool definition 'get_weather'.*: it has no tool support"):
        build_datasets(cfg, tok)


@pytest.mark.parametrize("turn, expected", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
     r"d.jsonl:1: turn 0 content part 0 is of type 'image_url': sft_scale trains on text only"),
    ({"role": "user", "content": "hi", "loss_weight": 0.5},
     r"d.jsonl:1: turn 0 has loss_weight 0.5; only 0 \(not trained\) and 1"),
    ({"from": "human", "value": "hi"}, r"d.jsonl:1: turn 0 needs a string 'role' field"),
    ({"role": "narrator", "content": "hi"},
     r"d.jsonl:1: turn 0 has role 'narrator'; expected one of .*roles: \{narrator: user"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
     r"d.jsonl:1: turn 0 tool call 0 arguments is text but not valid JSON"),
])
def test_bad_turns_name_file_line_and_turn(tmp_path, tok, turn, expected):
    rec = {"messages": [turn, {"role": "assistant", "content": "ok"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    cfg = cfg_for(tmp_path, "  train_files: [d.jsonl]\n  max_seq_len: 256\n")
    with pytest.raises(DataError, match=expected):
        build_datasets(cfg, tok)


def test_labels_that_are_mappings_or_nan_are_refused():
    with pytest.raises(DataError, match=r"a.jsonl:3: 'label' is \{'name': 'negative'\}: a label "
                                        r"must be a name"):
        to_example({"text": "bad", "label": {"name": "negative"}, "_source": "a.jsonl:3"},
                   "classification", task="classification")
    with pytest.raises(DataError, match=r"a.jsonl:3: classification record has no label "
                                        r"\('label' is NaN\)"):
        to_example({"text": "t", "label": math.nan, "_source": "a.jsonl:3"}, "classification")
    with pytest.raises(DataError, match=r"a.jsonl:4: .* \('answer' is NaN; expected"):
        to_example({"prompt": "p", "answer": math.nan, "_source": "a.jsonl:4"},
                   "prompt_completion", answer_field="answer")


def test_eval_label_missing_from_train_names_file_and_line(tmp_path, tok):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n"
                                              for i, lab in enumerate(["pos", "neg"] * 4)))
    (tmp_path / "e.jsonl").write_text('{"text": "x", "label": "pos"}\n'
                                      '{"text": "y", "label": "neutral"}\n')
    cfg = cfg_for(tmp_path, "  train_files: [t.jsonl]\n  eval_files: [e.jsonl]\n"
                  "  max_seq_len: 64\n", "task: classification\n")
    with pytest.raises(DataError, match=r"e.jsonl:2: label 'neutral' is not one of the labels "
                                        r"\['neg', 'pos'\].*must also occur in the training"):
        build_datasets(cfg, tok)


def test_proportional_truncation_keeps_part_of_a_long_prompt(tmp_path, tok, caplog):
    rows = [{"prompt": "word " * 60, "completion": " the answer is yes"},
            {"prompt": "ok", "completion": " fine"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(tmp_path, "  train_files: [d.jsonl]\n  max_seq_len: 32\n")
    with caplog.at_level(logging.WARNING):
        train, _, stats = build_datasets(cfg, tok)
    assert stats.dropped_no_trainable == 1 and len(train) == 1
    assert "dropped with no trainable token (" in caplog.text and "d.jsonl:1" in caplog.text
    cfg = cfg_for(tmp_path, "  train_files: [d.jsonl]\n  max_seq_len: 32\n"
                  "  truncation: proportional\n")
    train, _, stats = build_datasets(cfg, tok)
    assert stats.dropped_no_trainable == 0 and len(train) == 2
    long = next(r for r in train if r["_source"].endswith(":1"))
    assert long["length"] == 32 and long["input_ids"][0] == tok.bos_token_id
    trained = tok.decode([t for t, lab in zip(long["input_ids"], long["labels"], strict=True)
                          if lab != IGNORE_INDEX])
    prompt = tok.decode([t for t, lab in zip(long["input_ids"][1:], long["labels"][1:], strict=True)
                         if lab == IGNORE_INDEX])
    assert trained.startswith(" the") and prompt.rstrip().endswith("word")


def test_duplicates_and_eval_overlap_are_counted_not_dropped(tmp_path, tok, caplog):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(6)]
    rows += [rows[0], rows[1]]  # two exact duplicates
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "e.jsonl").write_text(json.dumps(rows[2]) + "\n" + json.dumps(
        {"prompt": "new", "completion": " one"}) + "\n")
    cfg = cfg_for(tmp_path, "  datasets:\n    - {path: t.jsonl, weight: 2.0}\n"
                  "  eval_files: [e.jsonl]\n  max_seq_len: 64\n")
    with caplog.at_level(logging.WARNING):
        train, ev, stats = build_datasets(cfg, tok)
    # upsampling by weight is meant and not counted; the two repeated records are
    assert len(train) == 16 and len(ev) == 2
    assert stats.duplicates == 2 and stats.eval_in_train == 1
    assert "2 records repeat an earlier record exactly" in caplog.text
    assert "1 examples are also in the training data (e.g. " in caplog.text


def test_max_seq_len_beyond_model_positions_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    cfg = cfg_for(tmp_path, "  train_files: [d.jsonl]\n  max_seq_len: 512\n")
    with pytest.raises(ConfigError, match=r"'data.max_seq_len' is 512 but the model has 256 "
                                          r"positions \(max_position_embeddings\)"):
        resolve_fast_paths(cfg, None, LlamaConfig(max_position_embeddings=256))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=256))
    resolve_fast_paths(cfg, None, LlamaConfig(max_position_embeddings=256))
