"""Turn a micro-batch of encoded examples into model inputs: padded, or padding-free packed."""

from __future__ import annotations

import torch

from sft_scale.data.tokenize import IGNORE_INDEX


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask."""
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


def collate_packed(examples: list[dict], pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """All examples in one row, no padding. Position ids restart at 0 for each example, and with
    no attention mask transformers derives a block-diagonal causal mask from them (varlen kernels
    with flash-attention), so no token attends across examples. The first label of each example
    is ignored: it would otherwise be 'predicted' from the previous example's last token."""
    ids, labels, pos = [], [], []
    for e in examples:
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        pos += list(range(len(e["input_ids"])))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos])}


def padding_stats(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, computed slots) of a collated batch."""
    slots = batch["input_ids"].numel()
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else slots
    return real, slots
