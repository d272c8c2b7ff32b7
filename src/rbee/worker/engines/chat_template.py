"""The model's chat template, rendered in the worker instead of by a round trip to llama.cpp.

A chat's prompt is the model's own Jinja template (from its GGUF file, as llama-server reports
it in /props) applied to the messages. Asking llama-server (`/apply-template`) costs a request
before every chat's first token; rendering here costs a fraction of that. llama.cpp renders
with its own Jinja engine and adapts some templates (a system message folded into the first
user message where the template has no system role, for one), so the worker renders a
template itself only after it agreed with llama.cpp on a set of probe conversations
(`agrees_with`); any template it renders differently stays with llama.cpp.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rbee.worker.engines.base import Message, PromptError, as_json

# Conversations a template must render exactly as llama.cpp does before the worker uses it:
# the shapes the worker sends (a user alone, a system prompt, turns of a conversation).
PROBES: tuple[tuple[Message, ...], ...] = (
    (Message("user", "What is the capital of France?"),),
    (Message("system", "Answer in one word."), Message("user", "Capital of France?")),
    (
        Message("system", "You are terse."),
        Message("user", 'Hi <b>there</b> & "quotes"\n'),
        Message("assistant", "Hello."),
        Message("user", "Capital of France? Ünïcode ✓"),
    ),
)


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Templates expect plain JSON, not Jinja's HTML-escaped variant.
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt; PromptError if the template refuses the messages."""
        try:
            return self._template.render(
                messages=as_json(messages),
                add_generation_prompt=True,
                **self._tokens,
            )
        except jinja2.TemplateError as exc:
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from None


def compile_template(source: str, bos_token: str, eos_token: str) -> ChatTemplate | None:
    """The template, or None if Jinja cannot compile it (llama.cpp renders it then)."""
    try:
        return ChatTemplate(source, bos_token, eos_token)
    except jinja2.TemplateError:
        return None


def agrees_with(template: ChatTemplate, llama_cpp: Sequence[str | None]) -> bool:
    """True if the template renders every probe as llama.cpp did (None: llama.cpp refused it,
    which the template must do too)."""
    for probe, expected in zip(PROBES, llama_cpp, strict=True):
        try:
            rendered: str | None = template.render(probe)
        except PromptError:
            rendered = None
        except Exception:  # a template that fails in a way llama.cpp does not
            return False
        if rendered != expected:
            return False
    return True
