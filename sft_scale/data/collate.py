"""Pad a list of encoded examples into one batch."""

from __future__ import annotations

import torch

from sft_scale.data.tokenize import IGNORE_INDEX


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
