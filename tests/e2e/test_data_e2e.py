"""The data pipeline through the real entry points."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_train, train_metrics

pytestmark = pytest.mark.slow

CHATS = [{"messages": [{"role": "system", "content": "Answer with one word."},
                       {"role": "user", "content": f"Review: {t}"},
                       {"role": "assistant", "content": lab}]}
         for t, lab in [("the soup was awful", "negative"), ("the staff were lovely", "positive"),
                        ("the room was noisy", "negative"),
                        ("the music was superb", "positive")] * 8]


def write_config(tmp_path, data: str, training: str = "") -> str:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  name_or_path: builtin:tiny-llama\nlora:\n  r: 8\n  alpha: 16\n"
                   "data:\n  max_seq_len: 256\n" + data
                   + "training:\n  micro_batch_size: 4\n  max_steps: 8\n"
                   "  learning_rate: 3.0e-3\n  logging_steps: 1\n" + training)
    return str(cfg)


def test_chat_data_trains_packed_with_full_padding_efficiency(tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    cfg = write_config(tmp_path, "  train_files: [chat.jsonl]\n  packing: true\n"
                       "  chat_template: chatml\n")
    out = tmp_path / "run"
    run_train(out, config=cfg)
    metrics = train_metrics(out)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["padding_efficiency"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["examples"] == len(CHATS)
    assert summary["padding_efficiency"] == 1.0


def test_bad_data_fails_before_anything_is_written(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    cfg = write_config(tmp_path, "  train_files: [bad.jsonl]\n")
    out = tmp_path / "never"
    proc = run_train(out, config=cfg, check=False)
    assert proc.returncode == 2
    assert "data error:" in proc.stderr and "bad.jsonl:2: not valid JSON" in proc.stderr
    assert not out.exists()


def test_data_preview_marks_trained_tokens_and_prints_stats(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sft_scale.cli", "data", "preview", "--config",
                           str(ROOT / "examples" / "demo.yaml"), "-n", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("--- example") == 2
    assert "Sentiment:« positive</s>»" in out or "Sentiment:« negative</s>»" in out
    for key in ("examples: 600", "truncated: 0", "dropped_no_trainable: 0", "padding_efficiency:"):
        assert key in out
