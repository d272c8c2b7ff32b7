"""What the worker accepts as an OpenAI request, and what it refuses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rbee.contracts.openai import ChatCompletionRequest, CompletionRequest


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_unknown_fields_are_kept_for_clients_that_send_newer_parameters() -> None:
    request = ChatCompletionRequest.model_validate(chat(store=True, vendor_knob={"a": 1}))
    assert request.model_extra == {"store": True, "vendor_knob": {"a": 1}}


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": None},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"max_tokens": "10"},
        {"max_tokens": 0},
        {"temperature": 3},
        {"temperature": "hot"},
        {"top_p": 0},
        {"stream": "yes"},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"n": 0},
        {"top_logprobs": 21},
        {"response_format": {"type": "yaml"}},
        {"tool_choice": "sometimes"},
        {"logit_bias": {"5": 101}},
        {"model": ""},
    ],
)
def test_wrong_values_of_known_fields_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(chat(**fields))


def test_a_request_without_messages_is_refused() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m"})


def test_text_parts_are_read_as_one_message() -> None:
    request = ChatCompletionRequest.model_validate(
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        )
    )
    assert request.messages[0].text() == "ab"


def test_max_completion_tokens_is_the_same_limit_under_its_newer_name() -> None:
    assert ChatCompletionRequest.model_validate(chat(max_completion_tokens=7)).token_limit() == 7
    assert ChatCompletionRequest.model_validate(chat(max_tokens=3)).token_limit() == 3


def test_completion_prompt_may_be_a_one_element_list_and_defaults_to_16_tokens() -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": ["Once"]})
    assert request.prompt_text() == "Once"
    assert request.max_tokens == 16
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": []})
