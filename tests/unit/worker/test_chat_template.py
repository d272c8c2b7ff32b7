"""Chat templates rendered in the worker, and the check that decides whether it may."""

from __future__ import annotations

import pytest

from rbee.worker.engines.base import Message, PromptError
from rbee.worker.engines.chat_template import PROBES, agrees_with, compile_template

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_renders_the_messages_and_the_generation_prompt() -> None:
    template = compile_template(CHATML, "<s>", "</s>")
    assert template is not None
    prompt = template.render([Message("user", "Hi & <b>bye</b>")])
    assert prompt == "<|im_start|>user\nHi & <b>bye</b><|im_end|>\n<|im_start|>assistant\n"


def test_templates_get_plain_json_their_tokens_and_can_refuse() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}{{ m | tojson }}{% endfor %}"
    )
    template = compile_template(source, "<s>", "</s>")
    assert template is not None
    assert template.render([Message("user", "<é>")]) == '<s>{"role": "user", "content": "<é>"}'
    with pytest.raises(PromptError, match="no system role"):
        template.render([Message("system", "x")])


def test_a_template_jinja_cannot_compile_is_left_to_llama_cpp() -> None:
    assert compile_template("{% for m in messages %}", "", "") is None


def test_only_a_template_that_renders_every_probe_as_llama_cpp_did_is_used() -> None:
    template = compile_template(CHATML, "", "")
    assert template is not None
    same = [template.render(probe) for probe in PROBES]
    assert agrees_with(template, same)
    assert not agrees_with(template, [*same[:-1], same[-1] + " "])
    # A probe llama.cpp refused must be refused here too.
    assert not agrees_with(template, [*same[:-1], None])
