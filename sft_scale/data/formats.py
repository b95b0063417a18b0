"""Record formats: detect them, check them, and turn each record into one canonical example.

Canonical examples are one of
  {"kind": "chat", "messages": [{"role", "content", "train"}]}   alpaca, messages, sharegpt
  {"kind": "completion", "prompt", "completion"}                    prompt/completion, classification
  {"kind": "text", "text"}                                          plain text (every token trained)
"""

from __future__ import annotations

from sft_scale.data.sources import DataError

PROMPT_KEYS = ("prompt",)
COMPLETION_KEYS = ("completion", "answer", "response")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant"}
# What each format needs, for detection and for error messages.
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion|answer|response"),
    "text": ("text",),
    "classification": ("text", "label"),
}


def detect_format(columns: list[str], where: str) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "prompt" in cols and cols & set(COMPLETION_KEYS):
        return "prompt_completion"
    if {"text", "label"} <= cols:
        return "classification"
    if "text" in cols:
        return "text"
    raise DataError(f"{where}: cannot tell the format from the fields {sorted(cols)}. Expected "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in REQUIRED.items())
                    + ". Set data.format (and data.prompt_field/answer_field) to say which.")


def _need(rec: dict, fmt: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not isinstance(rec.get(k), str)]
    if missing:
        raise DataError(f"{rec['_source']}: record does not fit format {fmt!r}: fields {missing} "
                        f"missing or not text (expected {list(REQUIRED[fmt])}; found "
                        f"{sorted(k for k in rec if not k.startswith('_') and rec[k] is not None)})")


def to_example(rec: dict, fmt: str, prompt_field: str | None = None,
               answer_field: str | None = None, system_prompt: str | None = None,
               task: str = "causal_lm") -> dict:
    if task == "classification":
        if fmt != "classification":
            raise DataError(f"{rec['_source']}: task: classification needs records with 'text' "
                            f"and 'label', this one is format {fmt!r}")
        _need(rec, fmt, ("text",))
        if rec.get("label") is None:
            raise DataError(f"{rec['_source']}: classification record has no label")
        return {"kind": "classification", "text": rec["text"], "label": rec["label"]}
    if fmt == "alpaca":
        _need(rec, fmt, ("instruction", "output"))
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = [{"role": "user", "content": user, "train": False},
                {"role": "assistant", "content": rec["output"], "train": True}]
        return _chat(msgs, rec.get("system") or system_prompt)
    if fmt == "messages":
        return _chat(_check_messages(rec, rec.get("messages"), "role", "content", None),
                     system_prompt)
    if fmt == "sharegpt":
        return _chat(_check_messages(rec, rec.get("conversations"), "from", "value",
                                     SHAREGPT_ROLES), system_prompt)
    if fmt == "prompt_completion":
        pk = prompt_field or "prompt"
        ak = answer_field or next((k for k in COMPLETION_KEYS if k in rec and rec[k] is not None),
                                  "completion")
        _need(rec, fmt, (pk, ak))
        return {"kind": "completion", "prompt": rec[pk], "completion": rec[ak]}
    if fmt == "text":
        _need(rec, fmt, ("text",))
        return {"kind": "text", "text": rec["text"]}
    if fmt == "classification":
        _need(rec, fmt, ("text",))
        if rec.get("label") is None:
            raise DataError(f"{rec['_source']}: classification record has no label")
        # For causal SFT a label is an answer to generate after the text.
        return {"kind": "completion", "prompt": f"{rec['text']}\nLabel:",
                "completion": f" {rec['label']}"}
    raise DataError(f"unknown format {fmt!r}; expected one of {list(REQUIRED)}")


def _chat(messages: list[dict], system_prompt: str | None) -> dict:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt, "train": False}] + messages
    return {"kind": "chat", "messages": messages}


def _check_messages(rec, msgs, role_key, content_key, role_map) -> list[dict]:
    fmt = "messages" if role_map is None else "sharegpt"
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{rec['_source']}: format {fmt!r} needs a non-empty list of turns in "
                        f"{REQUIRED[fmt][0]!r}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get(content_key), str) \
                or not isinstance(m.get(role_key), str):
            raise DataError(f"{rec['_source']}: turn {i} needs string {role_key!r} and "
                            f"{content_key!r} fields, got {m!r}")
        role = m[role_key] if role_map is None else role_map.get(m[role_key])
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{rec['_source']}: turn {i} has role {m[role_key]!r}; expected "
                            f"{sorted(role_map) if role_map else ['system', 'user', 'assistant']}")
        train = m.get("train")
        out.append({"role": role, "content": m[content_key],
                    "train": (role == "assistant") if train is None else bool(train)
                    and role == "assistant"})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{rec['_source']}: the conversation has no assistant turn to learn from")
    return out
