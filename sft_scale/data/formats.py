"""Record formats: detect them, check them, and turn each record into one canonical example.

Canonical examples are one of
  {"kind": "chat", "messages": [{"role", "content", "train", "tool_calls"?, ...}], "tools"?}
                                                                   alpaca, messages, sharegpt
  {"kind": "completion", "prompt", "completion"}                   prompt/completion, classification
  {"kind": "text", "text"}                                         plain text (every token trained)

Chat turns come in the shapes real datasets use: OpenAI messages (content as text or as a list of
content parts; `tool_calls` on assistant turns, `tool` turns), ShareGPT / LLaMA-Factory
conversations (`from`/`value`, `function_call` and `observation` turns, a `tools` column), and
any other field and role names through a source's `columns` / `role_key` / `content_key` /
`roles`. Tool calls are kept structured so the chat template renders them its own way.
"""

from __future__ import annotations

import json
import math

from sft_scale.data.sources import DataError

PROMPT_KEYS = ("prompt",)
COMPLETION_KEYS = ("completion", "answer", "response")
# Role tags of OpenAI messages and of ShareGPT / LLaMA-Factory conversations, -> ours.
# function_call is an assistant tool call written as JSON text in the turn's content.
DEFAULT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                 "human": "user", "gpt": "assistant", "model": "assistant",
                 "observation": "tool", "function_call": "function_call", "function": "tool",
                 "ipython": "tool"}
CANONICAL_ROLES = ("system", "user", "assistant", "tool", "function_call")
# What each format needs, for detection and for error messages.
REQUIRED = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion|answer|response"),
    "text": ("text",),
    "classification": ("text", "label"),
}
# The fields each format reads besides the required ones; any other column is reported.
OPTIONAL = {"alpaca": ("input", "system", "history", "tools"), "messages": ("system", "tools"),
            "sharegpt": ("system", "tools"), "prompt_completion": COMPLETION_KEYS,
            "text": (), "classification": ()}
# Columns of multimodal datasets (LLaMA-Factory's mllm demos and others): we train text only.
MODALITY_COLUMNS = ("images", "image", "videos", "video", "audios", "audio")


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
                    + ". Set data.format (and data.prompt_field/answer_field, or a source's "
                      "columns: mapping) to say which.")


def unused_columns(columns: list[str], fmt: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Columns the format does not read (a modality column is refused before this)."""
    used = {k for r in REQUIRED[fmt] for k in r.split("|")} | set(OPTIONAL[fmt]) | set(extra)
    return sorted(c for c in columns if c not in used and not c.startswith("_"))


def _describe(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _need(rec: dict, fmt: str, keys: tuple[str, ...]) -> None:
    bad = [k for k in keys if not isinstance(rec.get(k), str)]
    if bad:
        # Say what each bad field is: a NaN (pandas/CSV exports) is not the same fix as a typo.
        what = ", ".join(f"{k!r} is {_describe(rec[k])}" if k in rec else f"{k!r} is absent"
                         for k in bad)
        raise DataError(f"{rec['_source']}: record does not fit format {fmt!r}: fields {bad} "
                        f"missing or not text ({what}; expected {list(REQUIRED[fmt])}; found "
                        f"{sorted(k for k in rec if not k.startswith('_') and rec[k] is not None)}"
                        ")")


def to_example(rec: dict, fmt: str, prompt_field: str | None = None,
               answer_field: str | None = None, system_prompt: str | None = None,
               task: str = "causal_lm", src=None, train_tool_calls: bool = True) -> dict:
    """`src` (a DatasetSource) brings the source's role_key / content_key / roles."""
    if task == "classification":
        if fmt != "classification":
            raise DataError(f"{rec['_source']}: task: classification needs records with 'text' "
                            f"and 'label', this one is format {fmt!r}")
        _need(rec, fmt, ("text",))
        return {"kind": "classification", "text": rec["text"], "label": _label(rec)}
    if fmt == "alpaca":
        _need(rec, fmt, ("instruction", "output"))
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = _history(rec) + [{"role": "user", "content": user, "train": False},
                                {"role": "assistant", "content": rec["output"], "train": True}]
        return _chat(msgs, rec.get("system") or system_prompt, _tools(rec))
    if fmt in ("messages", "sharegpt"):
        field = REQUIRED[fmt][0]
        sharegpt = fmt == "sharegpt"
        role_key = getattr(src, "role_key", None) or ("from" if sharegpt else "role")
        content_key = getattr(src, "content_key", None) or ("value" if sharegpt else "content")
        roles = dict(DEFAULT_ROLES, **(getattr(src, "roles", None) or {}))
        msgs = _check_messages(rec, rec.get(field), fmt, role_key, content_key, roles,
                               train_tool_calls)
        return _chat(msgs, rec.get("system") or system_prompt, _tools(rec))
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
        # For causal SFT a label is an answer to generate after the text.
        return {"kind": "completion", "prompt": f"{rec['text']}\nLabel:",
                "completion": f" {_label(rec)}"}
    raise DataError(f"unknown format {fmt!r}; expected one of {list(REQUIRED)}")


def _label(rec: dict):
    """A label name (text, number, bool) or a list of them; anything else would become a label
    like "{'name': 'negative'}" without a word."""
    label = rec.get("label")

    def ok(x):
        return isinstance(x, (str, int, bool)) or (isinstance(x, float) and not math.isnan(x))
    if label is None or (isinstance(label, float) and math.isnan(label)):
        raise DataError(f"{rec['_source']}: classification record has no label ('label' is "
                        f"{_describe(label)})")
    if not (ok(label) or (isinstance(label, list) and label and all(ok(x) for x in label))):
        raise DataError(f"{rec['_source']}: 'label' is {label!r}: a label must be a name (text "
                        "or number) or, for multi-label data, a list of names. Flatten the field "
                        "(e.g. write its name), or map another column with the source's "
                        "columns: {label: ...}")
    return label


def _chat(messages: list[dict], system_prompt: str | None, tools: list | None = None) -> dict:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt, "train": False}] + messages
    ex = {"kind": "chat", "messages": messages}
    if tools:
        ex["tools"] = tools
    return ex


def _history(rec: dict) -> list[dict]:
    """Alpaca `history`: earlier [instruction, answer] pairs (LLaMA-Factory), trained too."""
    hist = rec.get("history")
    if not hist:
        return []
    out = []
    for i, pair in enumerate(hist):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{rec['_source']}: history[{i}] must be a [instruction, answer] pair "
                            f"of texts, got {pair!r}")
        out += [{"role": "user", "content": pair[0], "train": False},
                {"role": "assistant", "content": pair[1], "train": True}]
    return out


def _json_field(rec: dict, value, what: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{rec['_source']}: {what} is text but not valid JSON ({e.msg} at "
                        f"column {e.colno}): {value[:80]!r}") from None


def _tools(rec: dict) -> list[dict] | None:
    """The `tools` column: a list (or JSON text of a list) of function definitions, bare
    ({name, description, parameters}) or OpenAI-wrapped ({type: function, function: {...}})."""
    raw = rec.get("tools")
    if raw is None or raw == "" or raw == []:
        return None
    tools = _json_field(rec, raw, "'tools'")
    if isinstance(tools, dict):
        tools = [tools]
    out = []
    for i, t in enumerate(tools if isinstance(tools, list) else [None]):
        if (isinstance(t, dict) and t.get("type") == "function"
                and isinstance(t.get("function"), dict)):
            out.append(t)
        elif isinstance(t, dict) and isinstance(t.get("name"), str):
            out.append({"type": "function", "function": t})
        else:
            raise DataError(f"{rec['_source']}: tools[{i}] is not a function definition "
                            "({name, description, parameters} or {type: function, function: "
                            f"{{...}}}}): {t!r}")
    return out


def _tool_call(rec: dict, call, where: str) -> dict:
    """One call as templates expect it: {type: function, function: {name, arguments: dict}}."""
    call = _json_field(rec, call, where)
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        fn, extra = call["function"], {k: call[k] for k in ("id",) if k in call}
    else:
        fn, extra = call, {}
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise DataError(f"{rec['_source']}: {where} is not a tool call ({{name, arguments}}): "
                        f"{call!r}")
    # OpenAI writes arguments as JSON text, templates render them with tojson: parse once here,
    # or they would be rendered as a quoted string.
    args = _json_field(rec, fn.get("arguments", fn.get("parameters", {})), f"{where} arguments")
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}, **extra}


def _content(rec: dict, value, where: str) -> str | None:
    """Text content: a string, or OpenAI content parts whose text parts are joined (the way chat
    templates that accept parts render them: back to back)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{rec['_source']}: {where} content part {j} is of type {kind!r}: "
                                "sft_scale trains on text only; remove the non-text parts (or "
                                "the record)")
        return "".join(texts)
    raise DataError(f"{rec['_source']}: {where} content must be text or a list of content parts, "
                    f"got {_describe(value)}")


def _check_messages(rec, msgs, fmt, role_key, content_key, roles, train_tool_calls) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{rec['_source']}: format {fmt!r} needs a non-empty list of turns in "
                        f"{REQUIRED[fmt][0]!r}")
    out = []
    for i, m in enumerate(msgs):
        where = f"turn {i}"
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str):
            raise DataError(f"{rec['_source']}: {where} needs a string {role_key!r} field, got "
                            f"{m!r} (set the source's role_key/content_key if its turns use "
                            "other names)")
        tag = m[role_key]
        role = roles.get(tag)
        if role not in CANONICAL_ROLES:
            raise DataError(f"{rec['_source']}: {where} has role {tag!r}; expected one of "
                            f"{sorted(roles)} (map other tags with the source's roles: "
                            f"{{{tag}: user|assistant|system|tool|function_call}})")
        content = _content(rec, m.get(content_key), where)
        calls = m.get("tool_calls")
        if role == "function_call":
            # LLaMA-Factory: the call (or a list of calls) as JSON text in the turn's value.
            parsed = _json_field(rec, content, f"{where} ({tag!r})")
            calls = parsed if isinstance(parsed, list) else [parsed]
            role, content = "assistant", ""
        if calls:
            if role != "assistant":
                raise DataError(f"{rec['_source']}: {where} has tool_calls but role {tag!r}; "
                                "only assistant turns call tools")
            calls = [_tool_call(rec, c, f"{where} tool call {k}") for k, c in
                     enumerate(calls if isinstance(calls, list) else [calls])]
        if content is None:
            if not calls:
                raise DataError(f"{rec['_source']}: {where} has no {content_key!r} text")
            content = ""
        turn = {"role": role, "content": content, "train": _train_flag(
            rec, m, where, role == "assistant", train_tool_calls if calls else True)}
        if calls:
            turn["tool_calls"] = calls
        for k in ("name", "tool_call_id"):
            if role == "tool" and isinstance(m.get(k), str):
                turn[k] = m[k]
        out.append(turn)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{rec['_source']}: the conversation has no assistant turn to learn from")
    return out


def _train_flag(rec, m: dict, where: str, assistant: bool, default: bool) -> bool:
    """Per-turn `train` (bool) or `loss_weight` (0 or 1); only assistant turns are trained."""
    train, weight = m.get("train"), m.get("loss_weight")
    if weight is not None:
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DataError(f"{rec['_source']}: {where} has loss_weight {weight!r}; only 0 (not "
                            "trained) and 1 (trained) are supported")
        if train is not None and bool(train) != bool(weight):
            raise DataError(f"{rec['_source']}: {where} says train: {train} and loss_weight: "
                            f"{weight}; keep one")
        train = bool(weight)
    if train is not None and not isinstance(train, bool):
        raise DataError(f"{rec['_source']}: {where} has train: {train!r}; expected true or false")
    return assistant and (default if train is None else train)
