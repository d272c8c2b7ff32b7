"""Anthropic Messages and OpenAI Responses requests as chat requests, and chat answers back, for
the grammar fallback (issue 25): what a client sends reaches the model, what the model called
reaches the client in its API's own shape, and what cannot be honoured is a 400."""

from __future__ import annotations

import json

import pytest

from rbee.common.errors import BadRequest
from rbee.contracts.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    FunctionCall,
    ToolCall,
    Usage,
)
from rbee.worker.translate.anthropic_messages import (
    chat_from_messages,
    message_events,
    message_from_chat,
)
from rbee.worker.translate.common import tools_asked
from rbee.worker.translate.openai_responses import (
    chat_from_responses,
    response_events,
    response_from_chat,
)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def answer(content: str | None, calls: list[ToolCall] | None, finish: str) -> ChatCompletion:
    return ChatCompletion(
        id="c",
        created=1,
        model="m",
        choices=[
            ChatChoice(
                message=AssistantMessage(content=content, tool_calls=calls),
                finish_reason=finish,  # type: ignore[arg-type]
            )
        ],
        usage=Usage(prompt_tokens=10, completion_tokens=4, total_tokens=14),
    )


CALL = ToolCall(
    id="call_abc", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')
)


def test_an_anthropic_conversation_with_tool_turns_becomes_a_valid_chat_request() -> None:
    chat = chat_from_messages(
        {
            "model": "m",
            "max_tokens": 50,
            "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["\n\n"],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {
                            "type": "tool_use",
                            "id": "t1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "21 C"}],
                },
            ],
            "tools": [{"name": "get_weather", "description": "Weather.", "input_schema": SCHEMA}],
            "tool_choice": {
                "type": "tool",
                "name": "get_weather",
                "disable_parallel_tool_use": True,
            },
        }
    )
    request = ChatCompletionRequest.model_validate(chat)
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[2].tool_calls is not None
    assert json.loads(request.messages[2].tool_calls[0].function.arguments) == {"city": "Paris"}
    assert request.messages[3].tool_call_id == "t1"
    assert request.tools is not None
    assert request.tools[0].function is not None
    assert request.tools[0].function.parameters == SCHEMA
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert (chat["max_tokens"], chat["stop"]) == (50, ["\n\n"])


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"messages": [], "top_k": 5},
    ],
)
def test_what_the_fallback_cannot_honour_is_a_400(body: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        chat_from_messages({"model": "m", "max_tokens": 5, **body})


def test_a_tool_call_comes_back_as_a_tool_use_block_whole_and_streamed() -> None:
    message = message_from_chat(answer(None, [CALL], "tool_calls"))
    assert message["stop_reason"] == "tool_use"
    (block,) = message["content"]
    assert block["type"] == "tool_use"
    assert (block["name"], block["input"]) == ("get_weather", {"city": "Paris"})
    assert message["usage"] == {"input_tokens": 10, "output_tokens": 4}
    events = [e.decode() for e in message_events(message)]
    kinds = [e.split("\n", 1)[0].removeprefix("event: ") for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    delta = json.loads(events[2].split("data: ", 1)[1])["delta"]
    assert json.loads(delta["partial_json"]) == {"city": "Paris"}


def test_a_responses_conversation_becomes_a_chat_request_and_its_call_a_function_call() -> None:
    body = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "21 C"},
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": SCHEMA}],
        "tool_choice": "required",
        "max_output_tokens": 40,
        "text": {"format": {"type": "text"}},
    }
    chat = chat_from_responses(body)
    request = ChatCompletionRequest.model_validate(chat)
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert (chat["tool_choice"], chat["max_tokens"]) == ("required", 40)
    response = response_from_chat(answer(None, [CALL], "tool_calls"), body)
    (item,) = response["output"]
    assert item["type"] == "function_call"
    assert (item["call_id"], item["name"]) == ("call_abc", "get_weather")
    assert response["status"] == "completed"
    assert response["usage"]["total_tokens"] == 14
    kinds = [
        json.loads(e.decode().split("data: ", 1)[1])["type"] for e in response_events(response)
    ]
    assert kinds[0] == "response.created"
    assert "response.function_call_arguments.done" in kinds
    assert kinds[-1] == "response.completed"


def test_a_cut_response_is_incomplete_and_a_json_schema_format_is_kept() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        "model": "m",
        "input": "x",
        "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}},
    }
    chat = chat_from_responses(body)
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": schema},
    }
    response = response_from_chat(answer("{", None, "length"), body)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize("field", ["previous_response_id", "background", "conversation"])
def test_stateful_responses_fields_are_a_400(field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        chat_from_responses({"model": "m", "input": "x", field: "resp_1"})
    assert caught.value.param == field


def test_tools_count_only_when_offered_and_not_turned_off() -> None:
    assert tools_asked({"tools": [{"name": "f"}]})
    assert not tools_asked({"tools": []})
    assert not tools_asked({"tools": [{"name": "f"}], "tool_choice": {"type": "none"}})
    assert not tools_asked({"tools": [{"name": "f"}], "tool_choice": "none"})
