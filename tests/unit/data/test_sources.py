"""Loading sources: every unreadable or odd file ends in one DataError line naming file and line;
.txt corpora; per-source column mapping; modality columns refused."""

import json
import logging
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sft_scale.config import DatasetSource, load_config
from sft_scale.data import DataError, build_datasets
from sft_scale.data.sources import load_source
from sft_scale.model_source import resolve_model_path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


def cfg_for(tmp_path, data_yaml: str):
    p = tmp_path / "cfg.yaml"
    p.write_text("model:\n  name_or_path: builtin:tiny-llama\ndata:\n  max_seq_len: 256\n"
                 + data_yaml)
    return load_config(p)


def test_non_utf8_file_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9.*iconv"):
        load_source(DatasetSource(path=str(tmp_path / "d.jsonl")))
    (tmp_path / "d.csv").write_bytes(b"text\nok\nna\xefve\n")
    with pytest.raises(DataError, match=r"d.csv:3: not UTF-8 text"):
        load_source(DatasetSource(path=str(tmp_path / "d.csv")))


def test_unreadable_file_is_one_clear_line(tmp_path, monkeypatch):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n')
    if os.geteuid() == 0:
        # root reads a chmod 000 file anyway: make the read fail as the OS does for other users.
        def denied(self):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "read_bytes", denied)
    else:
        p.chmod(0)
    with pytest.raises(DataError, match=r"d.jsonl: cannot be read: permission denied"):
        load_source(DatasetSource(path=str(p)))


@pytest.mark.parametrize("depth, expected", [
    (100, r"d.jsonl:2: JSON nested 101 levels deep; at most 60"),
    (50000, r"d.jsonl:2: JSON nested too deeply to read"),
])
def test_deeply_nested_json_names_the_line(tmp_path, depth, expected):
    deep = '{"text": "b", "x": ' + "[" * depth + "]" * depth + "}"
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n' + deep + "\n")
    with pytest.raises(DataError, match=expected):
        load_source(DatasetSource(path=str(tmp_path / "d.jsonl")))
    (tmp_path / "d.json").write_text("[" + '{"text": "a"},' + deep + "]")
    with pytest.raises(DataError, match=r"d.json"):
        load_source(DatasetSource(path=str(tmp_path / "d.json")))


def test_malformed_json_points_at_the_right_column(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n'
                                      '{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON \(Expecting value at "
                                        r"column 31\)"):
        load_source(DatasetSource(path=str(tmp_path / "d.jsonl")))


@pytest.mark.parametrize("sample_by, texts, lines", [
    ("line", ["The first line of a corpus.", "The second line.", "A second paragraph",
              "that spans two lines."], [1, 2, 4, 5]),
    ("paragraph", ["The first line of a corpus.\nThe second line.",
                   "A second paragraph\nthat spans two lines."], [1, 4]),
    ("document", [(FIXTURES / "corpus_sample.txt").read_text()], [1]),
])
def test_txt_corpus_is_text_format_with_lines(sample_by, texts, lines):
    ds = load_source(DatasetSource(path=str(FIXTURES / "corpus_sample.txt"), sample_by=sample_by))
    assert ds["text"] == texts
    assert [int(s.rsplit(":", 1)[1]) for s in ds["_source"]] == lines


def test_unknown_suffix_is_not_reported_as_not_found(tmp_path):
    (tmp_path / "d.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match=r"d.tsv: a .tsv file is not a data format"):
        load_source(DatasetSource(path=str(tmp_path / "d.tsv")))


def test_column_and_role_mapping_for_any_source(tmp_path, tok):
    rec = {"dialog": [{"speaker": "customer", "text": "Where is my parcel?"},
                      {"speaker": "agent", "text": "It ships today."}], "sys": "Be kind."}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    cfg = cfg_for(tmp_path, "  datasets:\n    - path: d.jsonl\n      columns: {messages: dialog, "
                            "system: sys}\n      role_key: speaker\n      content_key: text\n"
                            "      roles: {customer: user, agent: assistant}\n"
                            "  chat_template: chatml\n")
    train, _, stats = build_datasets(cfg, tok)
    text = tok.decode(train[0]["input_ids"])
    assert "<|im_start|>system\nBe kind.<|im_end|>" in text
    assert "<|im_start|>user\nWhere is my parcel?" in text and stats.trained_tokens > 0
    cfg = cfg_for(tmp_path, "  datasets:\n    - {path: d.jsonl, columns: {messages: dialogue}}\n")
    with pytest.raises(DataError, match=r"columns mapping \{'messages': 'dialogue'\} names "
                                        r"fields the data does not have; its fields are "
                                        r"\['dialog', 'sys'\]"):
        build_datasets(cfg, tok)
    cfg = cfg_for(tmp_path, "  datasets:\n    - {path: d.jsonl, columns: {messages: dialog}}\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: turn 0 needs a string 'role' field.*"
                                        r"role_key/content_key"):
        build_datasets(cfg, tok)


def test_modality_column_refused_and_unused_columns_named(tmp_path, tok, caplog):
    rows = [{"instruction": "Describe it.", "output": "A cat.", "images": []},
            {"instruction": "And this?", "output": "A dog.", "images": ["dog.png"]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(tmp_path, "  train_files: [d.jsonl]\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: column 'images' holds images.*text-only"):
        build_datasets(cfg, tok)
    rows = [{"instruction": "Say hi.", "output": "Hi.", "rating": 5}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        build_datasets(cfg, tok)
    assert "columns ['rating'] are not used by format alpaca" in caplog.text
