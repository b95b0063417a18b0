"""Turn a micro-batch of encoded examples into model inputs: padded, or padding-free packed."""

from __future__ import annotations

import torch

from sft_scale.data.tokenize import IGNORE_INDEX


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:  # Python lists first, one tensor each: far cheaper than per-row copies
        k = len(e["input_ids"])
        ids.append(list(e["input_ids"]) + [pad_token_id] * (width - k))
        labels.append(list(e["labels"]) + [IGNORE_INDEX] * (width - k))
        mask.append([1] * k + [0] * (width - k))
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long)}


def collate_packed(examples: list[dict],
                   pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """All examples in one row, no padding. Position ids restart at 0 for each example, and with
    no attention mask transformers derives a block-diagonal causal mask from them (varlen kernels
    with flash-attention), so no token attends across examples. The first label of each example
    is ignored: it would otherwise be 'predicted' from the previous example's last token.

    The example boundaries also travel as `cu_seq_lens_q/k` (cumulative lengths, int32) and
    `max_length_q/k` (an int): flash-attention's varlen path and our packed-row SDPA
    (sft_scale/training/attention.py) read them instead of re-deriving them from the position
    ids."""
    ids, labels, pos, cu = [], [], [], [0]
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        pos += range(n)
        cu.append(cu[-1] + n)
    cu_seq_lens = torch.tensor(cu, dtype=torch.int32)
    longest = max(b - a for a, b in zip(cu, cu[1:], strict=False))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]), "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch with its tensors on `device` (ints such as max_length_q stay as they are)."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def padding_stats(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, computed slots) of a collated batch."""
    slots = batch["input_ids"].numel()
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else slots
    return real, slots
