"""Rendering chat messages with a model's own Jinja chat template, in a sandbox.

Templates come with model files, so they run in Jinja's ``ImmutableSandboxedEnvironment``
(no attribute access to internals, no mutation of passed objects), with the few helpers
Hugging Face templates expect: ``raise_exception``, ``strftime_now`` and a ``tojson`` filter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rbees.protocol import ChatMessage
from rbees.worker.engines.base import PromptError


def _raise_exception(message: str) -> NoReturn:
    raise PromptError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise PromptError(f"the model's chat template does not compile: {exc}") from exc
        self._bos_token = bos_token or ""
        self._eos_token = eos_token or ""

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=[m.model_dump() for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except PromptError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise PromptError(f"the chat template failed on these messages: {exc}") from exc


def pick_template(chat_template: object) -> str | None:
    """The template string from a tokenizer's ``chat_template`` (a string or named templates)."""
    if isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, dict):
        default = chat_template.get("default")
        return default if isinstance(default, str) else None
    if isinstance(chat_template, list):
        for item in chat_template:
            if isinstance(item, dict) and item.get("name") == "default":
                template = item.get("template")
                return template if isinstance(template, str) else None
    return None
