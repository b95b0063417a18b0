"""Chat templates: the tokenizer's own when it has one, else a named fallback.

Rendering itself is the tokenizer's `apply_chat_template` (Jinja, as the model's authors wrote
it); we only add the fallbacks and find where each assistant turn sits in the rendered text.
"""

from __future__ import annotations

# ChatML; with tools, the Hermes / Qwen2.5 convention (definitions in the system turn, calls as
# <tool_call> JSON); without tools it renders exactly plain ChatML.
CHATML = (
    "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages and messages[0]['role'] == 'system' %}"
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
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3}


def resolve_template(tokenizer, choice: str) -> str:
    """The Jinja template to use for `data.chat_template` = auto | tokenizer | a name | Jinja."""
    own = getattr(tokenizer, "chat_template", None)
    if choice == "auto":
        return own or CHATML
    if choice == "tokenizer":
        if not own:
            raise ValueError("data.chat_template: 'tokenizer' but this tokenizer has no chat "
                             f"template; use one of {sorted(NAMED)} or 'auto'")
        return own
    if choice in NAMED:
        return NAMED[choice]
    if "{%" in choice or "{{" in choice:
        return choice
    raise ValueError(f"data.chat_template: {choice!r} is not 'auto', 'tokenizer', one of "
                     f"{sorted(NAMED)}, nor Jinja text")


TURN_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool,
           tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(
        [{k: m[k] for k in TURN_KEYS if k in m} for m in messages], tools=tools,
        chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_tools_rendered(text: str, messages: list[dict], tools: list[dict] | None) -> None:
    """A template without tool support drops tool definitions and calls without a word (an
    assistant turn that only calls a tool would train just its end-of-turn marker): refuse."""
    names = [(f"tool definition {t['function']['name']!r}", t["function"]["name"])
             for t in tools or []]
    names += [(f"turn {i}'s tool call {c['function']['name']!r}", c["function"]["name"])
              for i, m in enumerate(messages) for c in m.get("tool_calls", [])]
    lost = [what for what, name in names if name not in text]
    if lost:
        raise ValueError(f"the chat template does not render {', '.join(lost)}: it has no tool "
                         "support. Use a template that renders tools (the model's own if it "
                         "has one, or data.chat_template: chatml)")


def assistant_spans(tokenizer, template: str, messages: list[dict],
                    tools: list[dict] | None = None) -> tuple[str, list[tuple]]:
    """The full rendered text and, per assistant turn, (start, end, train) character spans.

    A turn's span runs from the end of the prompt that precedes it (rendered with the generation
    prompt) to the end of the rendering that includes it, less trailing whitespace: the answer
    and the template's end-of-turn marker, which the model must learn to emit.
    """
    full = render(tokenizer, template, messages, add_generation_prompt=False, tools=tools)
    check_tools_rendered(full, messages, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render(tokenizer, template, messages[: i + 1], add_generation_prompt=False,
                      tools=tools)
        if not full.startswith(upto) or not upto.startswith(before):
            # E.g. templates that rewrite earlier turns once a later one exists (some drop the
            # reasoning of past turns): the mask cannot be derived by prefixes.
            raise ValueError("the chat template does not render conversations incrementally "
                             "(a prefix changes when a turn is added), so answer masks cannot be "
                             "derived; choose another data.chat_template")
        end = len(upto.rstrip())
        spans.append((len(before), end, m["train"]))
    return full, spans
