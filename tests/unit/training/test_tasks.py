import pytest
import torch
import torch.nn.functional as F

from sft_scale.tools.generation_eval import contains, exact_match, label_scores
from sft_scale.training.tasks import classification, classification_metrics


class Head(torch.nn.Module):
    """Stands in for a model: returns fixed logits (no GPU involved; a pure function)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **_):
        return type("Out", (), {"logits": self.logits})


def batch(labels):
    return {"input_ids": torch.zeros(len(labels), 3, dtype=torch.long),
            "attention_mask": torch.ones(len(labels), 3, dtype=torch.long), "labels": labels}


def test_binary_uses_bce_with_logits_on_one_logit():
    logits = torch.tensor([[0.3], [-1.2], [2.0]])
    labels = torch.tensor([1.0, 0.0, 0.0])
    got = classification(2, "binary").loss(Head(logits), batch(labels), 3)
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], labels).item()
    assert got.item() == pytest.approx(expected)


def test_multiclass_uses_cross_entropy_and_multilabel_bce():
    logits = torch.tensor([[0.3, 1.0, -1.0], [2.0, 0.1, 0.0]])
    labels = torch.tensor([2, 0])
    got = classification(3, "single_label").loss(Head(logits), batch(labels), 2)
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels).item())
    hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    got = classification(3, "multi_label").loss(Head(logits), batch(hot), 2)
    assert got.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, hot).item())


def test_collate_carries_labels_with_the_right_dtype():
    ex = [{"input_ids": [1, 5, 2], "label": 1}, {"input_ids": [1, 2], "label": 0}]
    b = classification(2, "binary").collate(ex, 0)
    assert b["labels"].dtype == torch.float and b["labels"].tolist() == [1.0, 0.0]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    b = classification(3, "single_label").collate(ex, 0)
    assert b["labels"].dtype == torch.long


def test_classification_metrics():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], 3, "single_label")
    assert m["accuracy"] == pytest.approx(0.75)
    # per class F1: c0 1.0, c1 2/3, c2 2/3
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    m = classification_metrics([[1, 0], [1, 1]], [[1, 0], [0, 1]], 2, "multi_label")
    assert m["accuracy"] == pytest.approx(0.5)


def test_generation_metrics():
    preds = [" positive", "negative!", " it was positive"]
    refs = ["positive", "negative", "positive"]
    assert exact_match(preds, refs) == pytest.approx(1 / 3)
    assert contains(preds, refs) == pytest.approx(1.0)
    s = label_scores([" positive", " negative", " negative", "x"] * 2,
                     ["positive", "negative", "positive", "negative"] * 2)
    assert s["accuracy"] == pytest.approx(0.5)
    # positive: tp 2, fn 2 -> F1 2/3; negative: tp 2, fp 2, fn 2 -> F1 1/2
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert label_scores(["a"], ["free text answer"]) == {}  # not a label task
