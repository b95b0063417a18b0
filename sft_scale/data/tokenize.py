"""Prompt/answer records -> input ids and labels with the loss on the answer (and EOS) only."""

from __future__ import annotations

IGNORE_INDEX = -100


def encode_prompt_answer(tokenizer, prompt: str, answer: str, max_seq_len: int) -> dict:
    """Tokenize prompt and answer separately, so the mask boundary is exact whatever the
    tokenizer merges across it; append EOS so the model learns to stop."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + a)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(p) + a)[:max_seq_len]
    return {"input_ids": ids, "labels": labels,
            "n_trained": sum(1 for x in labels if x != IGNORE_INDEX)}


def tokenize_dataset(records: list[dict], tokenizer, max_seq_len: int):
    """A `datasets.Dataset` of encoded examples; examples with no trainable token are dropped
    (a truncation that cut the whole answer away would otherwise train on nothing)."""
    from datasets import Dataset

    ds = Dataset.from_list(records)
    ds = ds.map(lambda r: encode_prompt_answer(tokenizer, r["prompt"], r["answer"], max_seq_len),
                remove_columns=["prompt", "answer"])
    kept = ds.filter(lambda r: r["n_trained"] > 0)
    return kept, len(ds) - len(kept)
