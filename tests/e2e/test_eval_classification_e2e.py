"""Evaluation during training, generation eval, and the classification task, end to end."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, read_jsonl, run_train, train_metrics

pytestmark = pytest.mark.slow
CLS = ROOT / "examples" / "classification.yaml"


def evals(out):
    return [m for m in read_jsonl(out / "metrics.jsonl") if "eval_loss" in m]


def test_classification_accuracy_rises_over_the_untrained_head(tmp_path):
    untrained = tmp_path / "untrained"
    run_train(untrained, "training.max_steps=1", "training.learning_rate=1e-12", config=CLS)
    trained = tmp_path / "trained"
    run_train(trained, config=CLS)
    before = json.loads((untrained / "summary.json").read_text())["eval"]["accuracy"]
    after = json.loads((trained / "summary.json").read_text())
    assert after["eval"]["accuracy"] >= 0.9 and after["eval"]["accuracy"] > before + 0.3
    assert after["problem"] == "binary" and after["eval"]["eval_items"] == 100
    # evaluated every 20 steps and at the end; best adapter kept; curves and event files written
    assert [m["step"] for m in evals(trained)] == [20, 40, 60]
    assert after["best"]["metric"] == "accuracy"
    assert (trained / "best_adapter" / "adapter_model.safetensors").exists()
    assert (trained / "loss.png").stat().st_size > 5000
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    cfg = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in cfg["modules_to_save"]


def test_classification_8bit_under_zero2_two_processes_counts_each_eval_example_once(tmp_path):
    out = tmp_path / "cls8"
    proc = run_train(out, "quantization.load_in_8bit=true", "training.micro_batch_size=8",
                     config=CLS, nproc=2, extra_launch=[
                         "--use_deepspeed", "--deepspeed_config_file",
                         str(ROOT / "ds_configs" / "zero2.json")])
    assert "world size 2" in proc.stderr and "Linear8bitLt" in proc.stderr
    final = json.loads((out / "summary.json").read_text())["eval"]
    assert final["eval_items"] == 100  # 50 per rank, none twice
    assert final["accuracy"] >= 0.9


@pytest.mark.parametrize("kind", ["multi_class", "multi_label"])
def test_multi_class_and_multi_label(tmp_path, kind):
    words = {"red": "colour", "blue": "colour", "cat": "animal", "dog": "animal",
             "one": "number", "two": "number"}
    rows = []
    for i in range(120):
        a, b = list(words)[i % 6], list(words)[(i * 5 + 1) % 6]
        label = words[a] if kind == "multi_class" else sorted({words[a], words[b]})
        rows.append({"text": f"{a} {b}" if kind == "multi_label" else f"the {a}", "label": label})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: classification\nmodel:\n  name_or_path: builtin:tiny-llama\n"
                   "data:\n  train_files: [d.jsonl]\n  eval_fraction: 0.2\n  max_seq_len: 256\n"
                   "training:\n  micro_batch_size: 16\n  max_steps: 30\n  learning_rate: 3.0e-3\n"
                   "  logging_steps: 1\nlora:\n  r: 16\n")
    out = tmp_path / "run"
    run_train(out, config=cfg)
    s = json.loads((out / "summary.json").read_text())
    assert s["problem"] == ("single_label" if kind == "multi_class" else "multi_label")
    assert s["data"]["labels"] == ["animal", "colour", "number"]
    m = train_metrics(out)
    assert m[-1]["loss"] < m[0]["loss"]
    assert s["eval"]["f1"] > 0.6


def test_causal_eval_during_training_two_processes_equals_one(tmp_path):
    sets = ("training.max_steps=4", "training.micro_batch_size=4", "eval.every_steps=2")
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(one, *sets, "training.gradient_accumulation_steps=2")
    run_train(two, *sets, nproc=2)
    e1, e2 = evals(one), evals(two)
    assert [e["step"] for e in e1] == [2, 4] and [e["step"] for e in e2] == [2, 4]
    for a, b in zip(e1, e2, strict=True):
        assert a["eval_items"] == b["eval_items"] == 200  # 100 answers + 100 EOS, each once
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
        assert b["perplexity"] == pytest.approx(2.718281828 ** b["eval_loss"], rel=1e-6)


def test_sft_scale_eval_prints_a_before_after_table(tmp_path):
    out = tmp_path / "run"
    run_train(out, "training.max_steps=60")
    proc = subprocess.run([sys.executable, "-m", "sft_scale.cli", "eval", "--model",
                           "builtin:tiny-llama", "--adapter", str(out / "adapter"), "--data",
                           str(ROOT / "sft_scale" / "assets" / "demo_eval.jsonl"),
                           "--max-new-tokens", "4"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
             if line.strip()}
    assert lines["metric"] == ["before", "after"]
    em_before, em_after = map(float, lines["exact_match"])
    assert em_before == 0.0 and em_after >= 0.9
    assert "macro_f1" in lines and "contains" in lines
