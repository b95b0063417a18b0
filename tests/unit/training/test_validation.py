"""Evaluation during training (sft_scale/training/validation.py) on a tiny Llama built from the test
fixture's config: the padded, batched numbers equal a plain per-example computation, every
example counts once, and `improved` follows each metric's direction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from sft_scale.config import load_config
from sft_scale.data import IGNORE_INDEX
from sft_scale.training.distributed import make_accelerator
from sft_scale.training.tasks import causal_lm, classification
from sft_scale.training.validation import evaluate, improved
from tests.helpers import DEMO_CONFIG, ROOT

CONFIG = ROOT / "tests" / "fixtures" / "model_configs" / "tiny_llama_cpu.json"
PAD = 0
SMALLER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
LENGTHS = [5, 9, 3, 7, 6]  # uneven: padding in every batch of 2, and a last batch of 1


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(load_config(DEMO_CONFIG))


def tiny(cls, **kw):
    """The fixture's architecture, narrowed: the arithmetic under test is the same at any size."""
    torch.manual_seed(0)
    config = LlamaConfig.from_json_file(CONFIG)
    for key, value in dict(SMALLER, **kw).items():
        setattr(config, key, value)
    return cls(config)


def examples() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(1, 2000, (n,), generator=g).tolist()  # no PAD inside
        prompt = 1 + i % 3  # the first tokens are the prompt: not trained
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:],
                     "length": n, "label": i % 3})
    return rows


def test_causal_lm_eval_equals_the_per_example_token_mean_and_restores_train_mode(accelerator):
    model = tiny(LlamaForCausalLM)
    rows = examples()
    total, items = 0.0, 0
    with torch.no_grad():
        for r in rows:  # one unpadded forward per example
            logits = model.eval()(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            target = torch.tensor(r["labels"][1:])
            total += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            items += int((target != IGNORE_INDEX).sum())
    model.train()
    got = evaluate(accelerator, model, Dataset.from_list(rows), causal_lm(packing=False),
                   micro_batch=2, pad_token_id=PAD)
    assert got["eval_items"] == items
    assert got["eval_loss"] == pytest.approx(total / items, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["eval_loss"]))
    assert set(got) == {"eval_loss", "eval_items", "perplexity"}
    assert model.training and all(p.grad is None for p in model.parameters())


def test_an_eval_model_stays_in_eval_mode(accelerator):
    model = tiny(LlamaForCausalLM).eval()
    evaluate(accelerator, model, examples(), causal_lm(packing=False), 4, PAD)
    assert not model.training


def macro_f1(preds: list[int], targets: list[int], classes: int) -> float:
    f1 = []
    for c in range(classes):
        tp = sum(p == c == t for p, t in zip(preds, targets, strict=True))
        fp = sum(p == c != t for p, t in zip(preds, targets, strict=True))
        fn = sum(t == c != p for p, t in zip(preds, targets, strict=True))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1) / classes


@pytest.mark.parametrize("problem,num_labels", [("single_label", 3), ("binary", 1)])
def test_classification_eval_equals_per_example_loss_accuracy_and_f1(accelerator, problem,
                                                                     num_labels):
    model = tiny(LlamaForSequenceClassification, num_labels=num_labels, pad_token_id=PAD)
    rows = examples()
    if problem == "binary":
        rows = [dict(r, label=float(r["label"] % 2)) for r in rows]
    losses, preds = [], []
    with torch.no_grad():
        for r in rows:
            logits = model.eval()(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            if problem == "binary":
                losses.append(F.binary_cross_entropy_with_logits(
                    logits[0], torch.tensor(r["label"])).item())
                preds.append(int(logits[0] > 0))
            else:
                losses.append(F.cross_entropy(logits, torch.tensor(r["label"])).item())
                preds.append(int(logits.argmax()))
    targets = [int(r["label"]) for r in rows]
    got = evaluate(accelerator, model, rows, classification(num_labels, problem), 2, PAD,
                   num_labels=num_labels, problem=problem)
    assert got["eval_items"] == len(rows)
    assert got["eval_loss"] == pytest.approx(sum(losses) / len(rows), rel=1e-5)
    assert got["accuracy"] == pytest.approx(
        sum(p == t for p, t in zip(preds, targets, strict=True)) / len(rows))
    assert got["f1"] == pytest.approx(macro_f1(preds, targets, max(num_labels, 2)))
    assert "perplexity" not in got


@pytest.mark.parametrize("metric,best,better,worse", [("eval_loss", 2.0, 1.5, 2.5),
                                                      ("accuracy", 0.7, 0.8, 0.6),
                                                      ("f1", 0.4, 0.5, 0.3)])
def test_improved_follows_each_metrics_direction(metric, best, better, worse):
    record = {"step": 10, "metric": metric, "value": best}
    assert improved(metric, better, record) and not improved(metric, worse, record)
    assert not improved(metric, best, record)  # a tie keeps the earlier best
    assert improved(metric, worse, None)  # the first eval is the best so far
