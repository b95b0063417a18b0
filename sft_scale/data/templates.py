"""Chat templates: the tokenizer's own when it has one, else a named fallback.

Rendering itself is the tokenizer's `apply_chat_template` (Jinja, as the model's authors wrote
it); we only add the fallbacks and find where each assistant turn sits in the rendered text.
"""

from __future__ import annotations

import difflib

import jinja2

from sft_scale.errors import ConfigError

# ChatML; with tools, the Hermes / Qwen2.5 convention (definitions in the system turn, calls as
# <tool_call> JSON); without tools it renders exactly plain ChatML.
CHATML = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{% if not (tools and loop.first and m['role'] == 'system') %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] or '') }}"
    "{% for c in m['tool_calls'] or [] %}{% if m['content'] or not loop.first %}{{ '\n' }}"
    "{% endif %}{{ '<tool_call>\n{\"name\": \"' + c['function']['name'] + '\", \"arguments\": '"
    " + (c['function']['arguments'] | tojson) + '}\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
    "+ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3}
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def resolve_template(tokenizer, choice: str) -> str:
    """The Jinja template to use for `data.chat_template` = auto | tokenizer | a name | Jinja,
    checked: it compiles, and renders a probe conversation inside the sandbox."""
    own = getattr(tokenizer, "chat_template", None)
    if choice == "auto":
        template = own or CHATML
    elif choice == "tokenizer":
        if not own:
            raise ConfigError("'data.chat_template: tokenizer' but this tokenizer has no chat "
                              f"template; use one of {sorted(NAMED)} or 'auto'")
        template = own
    elif choice in NAMED:
        template = NAMED[choice]
    elif "{%" in choice or "{{" in choice:
        template = choice
    else:
        near = difflib.get_close_matches(choice, list(NAMED), n=1)
        raise ConfigError(f"'data.chat_template': {choice!r} is not 'auto', 'tokenizer', one of "
                          f"{sorted(NAMED)}, nor Jinja text"
                          + (f"; did you mean {near[0]!r}?" if near else ""))
    check_template(tokenizer, template, "the tokenizer's chat template"
                   if template is own else "'data.chat_template'")
    return template


def check_template(tokenizer, template: str, what: str) -> None:
    """Render a two-turn probe as training will: a template that does not compile, or that the
    sandbox blocks (transformers renders chat templates in Jinja's ImmutableSandboxedEnvironment,
    which refuses e.g. attribute access to Python internals or mutating lists), fails here with
    the reason, not as a traceback inside data preprocessing."""
    try:
        render(tokenizer, template, PROBE, add_generation_prompt=False)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{what} does not compile as Jinja: {e.message} (line {e.lineno} of "
                          "the template). Fix the template, or use one of "
                          f"{sorted(NAMED)}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ConfigError(f"{what} is blocked by the chat-template sandbox: "
                          f"{str(e).rstrip('.')}. Templates may only format the messages; "
                          "remove that construct, or use one of "
                          f"{sorted(NAMED)}") from None
    except jinja2.TemplateError:
        pass  # e.g. raise_exception() for a conversation shape the template refuses: data's call


def fallback_warning(tokenizer, choice: str) -> str | None:
    """What to tell the user when `auto` found no template on the tokenizer and chose ChatML: the
    model will be trained (and saved) with a format its base never saw, and ChatML's markers are
    plain text to a tokenizer without them as tokens."""
    if choice != "auto" or getattr(tokenizer, "chat_template", None):
        return None
    missing = [t for t in ("<|im_start|>", "<|im_end|>")
               if t not in tokenizer.get_vocab()]
    return ("data.chat_template: auto, but the tokenizer has no chat template: training with "
            "ChatML, which is saved with the adapter and merged model. "
            + (f"{missing} are not tokens of this tokenizer, so they are trained as plain text "
               "and EOS ends each answer. " if missing else "")
            + "Set data.chat_template to the template your model will be served with "
            f"(one of {sorted(NAMED)}, or Jinja text) to silence this.")


# Keys of our canonical messages that are training instructions, not message fields: they are
# not passed to the template. Everything else (tool_calls, name, ...) goes to it unchanged.
TRAINING_KEYS = ("train", "loss_weight")


def template_message(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TRAINING_KEYS}


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool,
           tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(
        [template_message(m) for m in messages], tools=tools, chat_template=template,
        tokenize=False, add_generation_prompt=add_generation_prompt)


def check_tools_rendered(text: str, messages: list[dict], tools: list[dict] | None) -> None:
    """A template without tool support drops tool definitions and calls without a word (an
    assistant turn that only calls a tool would train just its end-of-turn marker): refuse."""
    names = [(f"tool definition {t['function']['name']!r}", t["function"]["name"])
             for t in tools or []]
    names += [(f"turn {i}'s tool call {c['function']['name']!r}", c["function"]["name"])
              for i, m in enumerate(messages) for c in m.get("tool_calls", [])]
    lost = [what for what, name in names if name not in text]
    if lost:
        raise ConfigError(f"the chat template does not render {', '.join(lost)}: it has no tool "
                          "support. Use a template that renders tools (the model's own if it "
                          "has one, or data.chat_template: chatml)")


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str, limit: int) -> int:
    i = 0
    while i < limit and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


# Stands in for an answer to locate where the template puts it; no template emits it itself.
_PROBE = "\u2983probe\u2984"


def assistant_spans(tokenizer, template: str, messages: list[dict],
                    tools: list[dict] | None = None) -> tuple[str, list[tuple]]:
    """The full rendered text and, per assistant turn, (start, end, train) character spans: the
    answer as the template renders it, and the end-of-turn marker the template closes the turn
    with, which the model must learn to emit. Not the template's header before the answer, and
    not what a template adds only when the conversation ends (Phi-3 appends EOS after the last
    turn; inference never produces it because it stops at the end-of-turn marker).

    Templates need not render incrementally (Mistral puts the system prompt in front of the last
    user message, so earlier text moves when a turn is added): each turn is located in the full
    rendering by rendering it once more with the answer replaced by a probe string.
    """
    full = render(tokenizer, template, messages, add_generation_prompt=False, tools=tools)
    check_tools_rendered(full, messages, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if m.get("tool_calls"):
            spans.append((*_tool_call_span(tokenizer, template, messages, i, tools, full),
                          m["train"]))
            continue
        probed = messages[:i] + [dict(m, content=_PROBE)] + messages[i + 1:]
        other = render(tokenizer, template, probed, add_generation_prompt=False, tools=tools)
        start = _common_prefix(full, other)
        end = len(full) - _common_suffix(full, other, min(len(full), len(other)) - start)
        if other.count(_PROBE) != 1 or other[start:start + len(_PROBE)] != _PROBE:
            raise ConfigError(f"the chat template does not render assistant turn {i}'s content "
                              "once, as given, so its loss mask cannot be located; choose "
                              "another data.chat_template")
        spans.append((start, end + _turn_end(tokenizer, template, messages[: i + 1], tools),
                      m["train"]))
    return full, spans


def _tool_call_span(tokenizer, template, messages, i, tools, full) -> tuple[int, int]:
    """Where assistant turn i, which calls tools, sits in `full`. Templates render a call their
    own way, often instead of the content (Llama-3.1) or joined to it only when there is content
    (Qwen2.5), so the probe replaces the whole turn: the turn starts where the renderings part,
    and ends where the rest of the conversation, rendered alike in both, begins."""
    plain = messages[:i] + [{"role": "assistant", "content": _PROBE}]
    other = render(tokenizer, template, plain + messages[i + 1:], False, tools)
    start = _common_prefix(full, other)
    rest = (other[other.index(_PROBE) + len(_PROBE)
                  + _turn_end(tokenizer, template, plain, tools):]
            if other.count(_PROBE) == 1 else None)
    if rest is None or not full.endswith(rest) or len(full) - len(rest) <= start:
        raise ConfigError(f"the chat template does not render assistant turn {i} (a tool call) "
                          "apart from the rest of the conversation, so its loss mask cannot be "
                          "located; choose another data.chat_template")
    return start, len(full) - len(rest)


def _turn_end(tokenizer, template: str, upto: list[dict], tools: list[dict] | None = None) -> int:
    """Length of the end-of-turn marker after the last (assistant) message of `upto`: what the
    template writes after the answer both when the conversation ends there and when a user turn
    follows, less trailing whitespace."""
    alone = render(tokenizer, template, upto[:-1] + [dict(upto[-1], content=_PROBE)], False,
                   tools)
    followed = render(tokenizer, template, upto[:-1] + [dict(upto[-1], content=_PROBE),
                                                         {"role": "user", "content": _PROBE}],
                      False, tools)
    a = alone[alone.index(_PROBE) + len(_PROBE):]
    b = followed[followed.index(_PROBE) + len(_PROBE):]
    # Compared token by token: "<|end|>\n<|endoftext|>" and "<|end|>\n<|user|>" share the
    # characters "<|" past the marker, but not the token.
    ta = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    tb = tokenizer(b, add_special_tokens=False)["input_ids"]
    k = _common_prefix(ta["input_ids"], tb)
    return len(a[:ta["offset_mapping"][k - 1][1]].rstrip()) if k else 0


def end_of_turn_tokens(tokenizer, template: str) -> list[str]:
    """The special tokens the template closes an assistant turn with (e.g. ["<|eot_id|>"],
    ["<|im_end|>"], ["</s>"]); [] when its marker is plain text or absent."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text, spans = assistant_spans(tokenizer, template, [dict(m, train=True) for m in msgs])
    except Exception:  # a template that needs other roles or shapes: nothing to learn here
        return []
    start, end, _ = spans[0]
    marker = text[start:end].split("Hello", 1)[-1]
    special = special_tokens(tokenizer)
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return [tokenizer.convert_ids_to_tokens(t) for t in ids if t in special]


def special_tokens(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, added ones included (<|im_end|>, <end_of_turn>)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids
