"""Chat templates: the tokenizer's own when it has one, else a named fallback.

Rendering itself is the tokenizer's `apply_chat_template` (Jinja, as the model's authors wrote
it); we only add the fallbacks and find where each assistant turn sits in the rendered text.
"""

from __future__ import annotations

import difflib

import jinja2

from sft_scale.errors import ConfigError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
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


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], chat_template=template,
        tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple]]:
    """The full rendered text and, per assistant turn, (start, end, train) character spans.

    A turn's span runs from the end of the prompt that precedes it (rendered with the generation
    prompt) to the end of the rendering that includes it, less trailing whitespace: the answer
    and the template's end-of-turn marker, which the model must learn to emit.
    """
    full = render(tokenizer, template, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, template, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(before):
            # E.g. templates that rewrite earlier turns once a later one exists (some drop the
            # reasoning of past turns): the mask cannot be derived by prefixes.
            raise ValueError("the chat template does not render conversations incrementally "
                             "(a prefix changes when a turn is added), so answer masks cannot be "
                             "derived; choose another data.chat_template")
        end = len(upto.rstrip())
        spans.append((len(before), end, m["train"]))
    return full, spans
