"""`data.chat_template`: names, Jinja that does not compile, and what the sandbox blocks, each a
config error before any data is tokenized."""

import pytest
from transformers import AutoTokenizer

from sft_scale.config import ConfigError
from sft_scale.data.templates import CHATML, LLAMA3, resolve_template
from sft_scale.model_source import resolve_model_path

LOOP = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


def test_names_and_jinja_text_resolve(tok):
    assert resolve_template(tok, "chatml") == CHATML
    assert resolve_template(tok, "llama3") == LLAMA3
    assert resolve_template(tok, LOOP) == LOOP
    # A template that refuses some conversation shapes is data's business, not a config error.
    refusing = "{% if messages|length > 5 %}{{ raise_exception('too long') }}{% endif %}" + LOOP
    assert resolve_template(tok, refusing) == refusing


def test_an_unknown_name_lists_the_names_and_the_nearest(tok):
    with pytest.raises(ConfigError, match=r"'data.chat_template': 'chatm' is not 'auto', "
                                          r"'tokenizer', one of \['chatml', 'llama3'\], nor Jinja "
                                          r"text; did you mean 'chatml'\?"):
        resolve_template(tok, "chatm")


def test_jinja_that_does_not_compile_names_the_reason_and_line(tok):
    with pytest.raises(ConfigError, match=r"'data.chat_template' does not compile as Jinja: "
                                          r".*\(line 2 of the template\)"):
        resolve_template(tok, "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")


@pytest.mark.parametrize("template", [
    "{% set seen = [] %}{{ seen.append(1) }}" + LOOP,  # mutating a list
    "{{ ''.__class__.__mro__[1].__subclasses__() }}" + LOOP,  # reaching Python internals
])
def test_a_template_the_sandbox_blocks_says_it_is_blocked(tok, template):
    with pytest.raises(ConfigError, match=r"'data.chat_template' is blocked by the chat-template "
                                          r"sandbox: access to attribute '\w+' of '\w+' object is "
                                          r"unsafe. Templates may only format the messages"):
        resolve_template(tok, template)
