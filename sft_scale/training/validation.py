"""Evaluation during training: loss (and perplexity, or accuracy/F1) on the held-out split.

Each rank scores a disjoint shard (example i goes to rank i % world), sums are all-reduced and
predictions gathered, so no example is counted twice or missed. Ranks run the same number of
batches (an empty shard repeats an example with zero weight) because under ZeRO-3 every forward
is a collective.
"""

from __future__ import annotations

import math

import torch
from accelerate.utils import gather_object

from sft_scale.data.collate import to_device
from sft_scale.data.loader import fetch_rows
from sft_scale.training.tasks import classification_metrics


@torch.no_grad()
def evaluate(accelerator, model, dataset, task, micro_batch: int, pad_token_id: int,
             num_labels: int = 0, problem: str = "") -> dict:
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(dataset), world))
    n_batches = math.ceil(math.ceil(len(dataset) / world) / micro_batch)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    items = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    preds, targets = [], []
    for b in range(n_batches):
        idx = mine[b * micro_batch:(b + 1) * micro_batch]
        real = bool(idx)
        batch = task.collate(fetch_rows(dataset, idx or [0]), pad_token_id)
        batch = to_device(batch, accelerator.device)
        summed, n, p, t = task.outputs(model, batch)
        if real:
            loss_sum += summed.double()
            items += n
            if p is not None:
                preds += p.tolist()
                targets += t.tolist()
    totals = accelerator.reduce(torch.stack([loss_sum, items]), reduction="sum").tolist()
    if was_training:
        model.train()
    result = {"eval_loss": totals[0] / max(totals[1], 1), "eval_items": int(totals[1])}
    if task.name == "causal_lm":
        result["perplexity"] = math.exp(min(result["eval_loss"], 50))
    else:
        preds, targets = gather_object(preds), gather_object(targets)
        result.update(classification_metrics(preds, targets, num_labels, problem))
    return result


def improved(metric: str, value: float, best: dict | None) -> bool:
    if best is None:
        return True
    return value < best["value"] if metric == "eval_loss" else value > best["value"]
