"""`sft-scale data prepare`: tokenized once, reused while the fingerprint matches, refused with
the changed keys when it does not."""

import dataclasses
import json
import os
import shutil

import pytest

from sft_scale.config import ConfigError, load_config
from sft_scale.data import build_datasets
from sft_scale.data.prepared import find_prepared, load_prepared, prepare
from sft_scale.training.model import load_tokenizer
from tests.helpers import DEMO_CONFIG, ROOT


def demo(tmp_path, *sets):
    if not (tmp_path / "train.jsonl").exists():  # a copy this test may change
        shutil.copy(ROOT / "sft_scale" / "assets" / "demo_train.jsonl", tmp_path / "train.jsonl")
    sets = ("data.eval_files=[]", "data.eval_fraction=0.25") + sets
    cfg = load_config(DEMO_CONFIG, list(sets), str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, train_files=[str(tmp_path / "train.jsonl")]))
    return cfg


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(load_config(DEMO_CONFIG))


def test_prepared_data_equals_tokenizing_in_the_job_and_is_written_once(tmp_path, tok):
    cfg = demo(tmp_path)
    assert find_prepared(cfg) is None  # nothing prepared: the job tokenizes
    path, stats, written = prepare(cfg, tok)
    assert written and path == tmp_path / "run" / "prepared_data" and find_prepared(cfg) == path
    train, eval_ds, loaded_stats = load_prepared(path, cfg, tok)
    ref_train, ref_eval, ref_stats = build_datasets(cfg, tok)
    assert train["input_ids"] == ref_train["input_ids"] and train["labels"] == ref_train["labels"]
    assert train["length"] == ref_train["length"] and eval_ds["labels"] == ref_eval["labels"]
    assert loaded_stats == ref_stats == stats and stats.eval_examples > 0
    # A requeued job's pre-step finds it up to date and tokenizes nothing.
    assert prepare(cfg, tok)[2] is False
    # Batching and speed settings are not part of what was tokenized.
    load_prepared(path, demo(tmp_path, "data.packing=false", "data.num_proc=2"), tok)


@pytest.mark.parametrize("change, named", [
    ("data.max_seq_len=32", "data.max_seq_len: 64 when prepared, 32 now"),
    ("data.train_on_inputs=true", "data.train_on_inputs: False when prepared, True now"),
    ("training.seed=1", "training.seed: 0 when prepared, 1 now"),
    ("data.chat_template=chatml", "data.chat_template"),
])
def test_a_changed_key_is_refused_by_name(tmp_path, tok, change, named):
    path, _, _ = prepare(demo(tmp_path), tok)
    with pytest.raises(ConfigError, match="does not match this config") as e:
        load_prepared(path, demo(tmp_path, change), tok)
    assert named in str(e.value) and "sft-scale data prepare --config" in str(e.value)


def test_a_changed_data_file_or_tokenizer_is_refused(tmp_path, tok):
    cfg = demo(tmp_path)
    path, _, _ = prepare(cfg, tok)
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "Review: new\nSentiment:", "completion": " positive"}) + "\n")
    with pytest.raises(ConfigError, match=r"data file\(s\) changed since: .*train.jsonl"):
        load_prepared(path, cfg, tok)
    prepare(cfg, tok)  # re-prepared: accepted again
    load_prepared(path, cfg, tok)
    other = load_tokenizer(cfg)
    other.add_tokens(["<extra_tool_token>"])
    with pytest.raises(ConfigError, match="the tokenizer"):
        load_prepared(path, cfg, other)


def test_a_named_prepared_dir_that_is_missing_says_how_to_make_it(tmp_path):
    cfg = demo(tmp_path, f"data.prepared_dir={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="no prepared data there .*sft-scale data prepare"):
        find_prepared(cfg)
    assert not os.path.exists(tmp_path / "run" / "prepared_data")
