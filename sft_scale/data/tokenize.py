"""Canonical examples -> input ids and labels, with the loss exactly where it belongs.

- completion: prompt and completion tokenized separately (the mask boundary is exact whatever the
  tokenizer would merge across it); BOS first; EOS appended after the completion.
- chat: rendered by the chat template, tokenized as rendered (any BOS is the template's); the
  tokens of each assistant turn's answer and end-of-turn marker are trained (when that turn's
  `train` is true). Nothing is inserted where the template closes the turn with a special token
  (<|eot_id|>, <|im_end|>, </s>...): the sequence is exactly what inference renders. Only a
  template whose turns end in plain text (or nothing) gets EOS after each answer, so the model
  still learns to stop.
- text: every token trained (continued pretraining).
`train_on_inputs` trains every token of every kind.
"""

from __future__ import annotations

from sft_scale.data.templates import assistant_spans, special_tokens

IGNORE_INDEX = -100


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_example(tokenizer, ex: dict, max_seq_len: int, template: str | None = None,
                   train_on_inputs: bool = False, truncation: str = "truncate") -> dict:
    if ex["kind"] == "completion":
        p = _bos(tokenizer) + tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
        ids = p + a + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(p) + a + [tokenizer.eos_token_id]
    elif ex["kind"] == "text":
        ids = _bos(tokenizer) + tokenizer(ex["text"], add_special_tokens=False)["input_ids"] \
            + [tokenizer.eos_token_id]
        labels = list(ids)
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
    elif ex["kind"] == "chat":
        ids, labels = _encode_chat(tokenizer, template, ex["messages"], ex.get("tools"))
    elif ex["kind"] == "classification":
        # EOS last: the head reads the final token, which then always means "end of text".
        ids = _bos(tokenizer) + tokenizer(ex["text"], add_special_tokens=False)["input_ids"]
        ids = ids[:max_seq_len - 1] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "length": len(ids),
                "original_length": len(ids), "truncated": False, "n_trained": 1,
                "label": ex["label_index"]}
    else:
        raise ValueError(f"unknown example kind {ex['kind']!r}")
    if train_on_inputs:
        labels = [IGNORE_INDEX] + ids[1:]
    length = len(ids)
    truncated = length > max_seq_len
    if truncated and truncation == "drop":
        ids, labels = [], []
    elif truncated and truncation == "proportional":
        bos = tokenizer.bos_token_id
        ids, labels = _proportional(ids, labels, max_seq_len,
                                    int(bos is not None and ids[0] == bos))
    else:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "length": len(ids), "original_length": length,
            "truncated": truncated, "n_trained": sum(1 for x in labels if x != IGNORE_INDEX)}


def _proportional(ids: list[int], labels: list[int], max_len: int, n_bos: int):
    """Cut the prompt (before the first trained token) and the rest in proportion to their
    lengths: the prompt keeps its BOS and its end (the question and the turn header next to the
    answer), the rest keeps its start. At least one trained token survives."""
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(ids))
    if first <= n_bos or first >= len(ids):
        return ids[:max_len], labels[:max_len]
    keep_p = max(n_bos, min(first, max_len - 1, round(max_len * first / len(ids))))
    keep_r = max_len - keep_p
    p_idx = list(range(n_bos)) + list(range(first - (keep_p - n_bos), first))
    idx = p_idx + list(range(first, first + keep_r))
    return [ids[i] for i in idx], [labels[i] for i in idx]


def _encode_chat(tokenizer, template: str, messages: list[dict],
                 tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, template, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = special_tokens(tokenizer)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    offsets = enc["offset_mapping"]
    span_i = 0
    for k, (tok_id, (start, end)) in enumerate(zip(enc["input_ids"], offsets, strict=True)):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        # Overlap, not containment: a SentencePiece "▁Hello" starts at the space the template
        # writes before the answer, and it is still the answer's first token.
        in_span = span_i < len(spans) and start < spans[span_i][1] and \
            (end > spans[span_i][0] or start >= spans[span_i][0])
        train = in_span and spans[span_i][2]
        ids.append(tok_id)
        labels.append(tok_id if train else IGNORE_INDEX)
        nxt = offsets[k + 1][0] if k + 1 < len(offsets) else len(text)
        if in_span and nxt >= spans[span_i][1] and tok_id not in special:
            # The turn ends in plain text: EOS is the only way the model can learn to stop.
            ids.append(eos)
            labels.append(eos if train else IGNORE_INDEX)
    return ids, labels
