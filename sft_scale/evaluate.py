"""Generation-based evaluation: greedy answers to held-out prompts, scored by exact match."""

from __future__ import annotations

import torch


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int,
                     batch_size: int = 32) -> list[str]:
    """Greedy continuations of each prompt, encoded exactly as training encodes prompts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = [bos + tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts[i:i + batch_size]]
        width = max(len(e) for e in enc)
        # Left padding, so every prompt ends where generation starts.
        ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, width - len(e):] = torch.tensor(e)
            mask[r, width - len(e):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    if was_training:
        model.train()
    return out


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references))
    return hits / len(references)


def evaluate_generation(model, tokenizer, records: list[dict], max_new_tokens: int) -> dict:
    preds = generate_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens)
    refs = [r["answer"] for r in records]
    return {"exact_match": exact_match(preds, refs), "n": len(records),
            "examples": [{"prompt": r["prompt"], "answer": r["answer"], "prediction": p}
                         for r, p in zip(records[:5], preds[:5])]}
