"""What differs between tasks: how a micro-batch is collated, what counts as one trained item for
loss normalisation, the loss itself, and the eval metrics.

causal_lm: next-token loss on the trained tokens (transformers' loss with `num_items_in_batch`, or
sft_scale.training.loss's chunked / Liger cross-entropy with the same meaning: `training.loss`).
classification: a sequence-classification head; binary -> BCEWithLogits on one logit,
multi-class -> cross-entropy, multi-label -> BCEWithLogits per label.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sft_scale.data import IGNORE_INDEX, collate, collate_packed
from sft_scale.training.attention import packed_forward
from sft_scale.training.loss import summed_loss


@dataclass
class Task:
    name: str
    collate: Callable[[list[dict], int], dict]
    count: Callable[[dict], int]  # items the loss averages over (tokens or examples)
    loss: Callable  # (model, batch, n_items_global) -> scalar: sum over the batch / n_items
    outputs: Callable  # (model, batch) -> (summed loss, items, predictions, targets) for eval


def causal_lm(packing: bool, loss: str = "standard") -> Task:
    """`loss`: standard | chunked | liger, as resolved by sft_scale.training.loss.resolve_loss."""
    count = count_trained_tokens

    def loss_fn(model, batch, n_items):
        with packed_forward(batch):
            if loss == "standard":
                return model(**batch, use_cache=False, num_items_in_batch=max(n_items, 1)).loss
            return summed_loss(model, batch, loss) / max(n_items, 1)

    def outputs(model, batch):
        n = count(batch)
        with packed_forward(batch):
            if loss == "standard":
                summed = model(**batch, use_cache=False, num_items_in_batch=max(n, 1)).loss * n
            else:
                summed = summed_loss(model, batch, loss)
        return summed, n, None, None

    return Task("causal_lm", collate_packed if packing else collate, count, loss_fn, outputs)


# collate and count run in DataLoader workers (data.num_workers): module-level functions (or
# partials of them) stay picklable under the spawn/forkserver start methods, closures would not.
def count_trained_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_examples(batch: dict) -> int:
    return len(batch["labels"])


def collate_classification(examples: list[dict], pad_token_id: int, problem: str) -> dict:
    batch = collate([dict(e, labels=[IGNORE_INDEX] * len(e["input_ids"])) for e in examples],
                    pad_token_id)
    dtype = torch.float if problem in ("binary", "multi_label") else torch.long
    batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
    return batch


def classification(num_labels: int, problem: str) -> Task:
    """`problem`: binary (one logit), single_label (num_labels logits) or multi_label."""

    def summed_loss(logits, labels):
        logits = logits.float()
        if problem == "binary":
            return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels, reduction="sum")
        if problem == "multi_label":
            # mean over labels, summed over examples
            return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / num_labels
        return F.cross_entropy(logits, labels, reduction="sum")

    def forward(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits

    def loss(model, batch, n_items):
        return summed_loss(forward(model, batch), batch["labels"]) / max(n_items, 1)

    def predictions(logits):
        if problem == "binary":
            return (logits.squeeze(-1) > 0).long()
        if problem == "multi_label":
            return (logits > 0).long()
        return logits.argmax(-1)

    def outputs(model, batch):
        logits = forward(model, batch).float()
        return (summed_loss(logits, batch["labels"]), len(batch["labels"]), predictions(logits),
                batch["labels"].long())

    return Task("classification", functools.partial(collate_classification, problem=problem),
                count_examples, loss, outputs)


def classification_metrics(preds: list, targets: list, num_labels: int, problem: str) -> dict:
    """Accuracy and macro-F1 (multi-label: exact-set accuracy and macro-F1 over labels)."""
    if not targets:
        return {}
    p, t = torch.tensor(preds), torch.tensor(targets)
    if problem == "multi_label":
        acc = (p == t).all(-1).float().mean().item()
        tp = ((p == 1) & (t == 1)).sum(0).float()
        fp = ((p == 1) & (t == 0)).sum(0).float()
        fn = ((p == 0) & (t == 1)).sum(0).float()
    else:
        acc = (p == t).float().mean().item()
        classes = torch.arange(max(num_labels, 2))
        tp = torch.stack([((p == c) & (t == c)).sum() for c in classes]).float()
        fp = torch.stack([((p == c) & (t != c)).sum() for c in classes]).float()
        fn = torch.stack([((p != c) & (t == c)).sum() for c in classes]).float()
    f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1)).mean().item()
    return {"accuracy": acc, "f1": f1}
