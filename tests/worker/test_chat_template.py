"""Chat templates render in a sandbox: model files cannot reach Python internals."""

from __future__ import annotations

import pytest

from rbees.protocol import ChatMessage
from rbees.worker.engines.base import PromptError
from rbees.worker.engines.chat_template import ChatTemplate, pick_template

MESSAGES = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]


def test_renders_messages_with_generation_prompt() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}"
        "<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    text = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(MESSAGES)
    assert text == "<s><system>Be brief.</s>\n<user>Hi</s>\n<assistant>"


def test_template_cannot_escape_the_sandbox() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(PromptError):
        ChatTemplate(evil, bos_token=None, eos_token=None).render(MESSAGES)


def test_template_raise_exception_is_a_prompt_error() -> None:
    source = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    with pytest.raises(PromptError, match="no system role"):
        ChatTemplate(source, bos_token=None, eos_token=None).render(MESSAGES)


def test_broken_template_is_a_prompt_error() -> None:
    with pytest.raises(PromptError):
        ChatTemplate("{% for %}", bos_token=None, eos_token=None)


def test_pick_template_from_named_templates() -> None:
    assert pick_template("x") == "x"
    assert pick_template({"default": "d", "tool_use": "t"}) == "d"
    assert pick_template([{"name": "default", "template": "d"}]) == "d"
    assert pick_template(None) is None
