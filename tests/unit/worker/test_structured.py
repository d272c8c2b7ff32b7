"""Tool calls and structured output as schemas, and the model's envelope read back."""

from __future__ import annotations

import json
from typing import Any

from rbee.contracts.openai import ChatCompletionRequest
from rbee.worker.structured import closed, plan_chat, read_tool_answer

TOOL = {
    "type": "function",
    "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {}}}},
}


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def test_closing_objects_keeps_what_the_schema_already_said() -> None:
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"properties": {"x": {}}}}},
        "additionalProperties": True,
    }
    assert closed(schema) == {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"properties": {"x": {}}, "additionalProperties": False},
            }
        },
        "additionalProperties": True,
    }


def test_closing_walks_schemas_only_never_data_or_property_names() -> None:
    schema = {
        "properties": {"properties": {"type": "string"}},
        "default": {"properties": {}},
        "$defs": {"Item": {"properties": {"a": {}}}},
        "anyOf": [{"properties": {}}],
    }
    assert closed(schema) == {
        "properties": {"properties": {"type": "string"}},
        "default": {"properties": {}},
        "$defs": {"Item": {"properties": {"a": {}}, "additionalProperties": False}},
        "anyOf": [{"properties": {}, "additionalProperties": False}],
        "additionalProperties": False,
    }


def test_auto_offers_calls_or_words_and_teaches_the_envelope() -> None:
    plan = plan_chat(request(tools=[TOOL]))
    assert plan.tools
    assert plan.json_schema is not None
    calls, words = plan.json_schema["anyOf"]
    assert "maxItems" not in calls["properties"]["tool_calls"]
    assert words["required"] == ["content"]
    assert plan.messages[0].role == "system"
    assert '"name": "add"' in plan.messages[0].content


def test_tool_choice_none_is_plain_text_and_developer_reads_as_system() -> None:
    plan = plan_chat(
        request(
            tools=[TOOL],
            tool_choice="none",
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
        )
    )
    assert (plan.tools, plan.json_schema) == (False, None)
    assert plan.messages[0].role == "system"


def test_tool_results_become_one_user_turn_after_the_call() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    plan = plan_chat(
        request(
            messages=[
                {"role": "user", "content": "add"},
                {"role": "assistant", "tool_calls": [call, {**call, "id": "c2"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "1"},
                {"role": "tool", "tool_call_id": "c2", "content": "2"},
            ]
        )
    )
    roles = [m.role for m in plan.messages]
    assert roles == ["user", "assistant", "user"]
    assert json.loads(plan.messages[1].content)["tool_calls"][0] == {
        "name": "add",
        "arguments": {"a": 1},
    }
    assert "c1: 1" in plan.messages[2].content
    assert "c2: 2" in plan.messages[2].content


def test_reading_the_envelope() -> None:
    called = read_tool_answer('{"tool_calls": [{"name": "add", "arguments": {"a": 1}}]}')
    assert called.content is None
    assert json.loads(called.tool_calls[0].function.arguments) == {"a": 1}
    assert read_tool_answer('{"content": "hello"}').content == "hello"
    cut = '{"tool_calls": [{"name": "ad'
    assert read_tool_answer(cut).content == cut
