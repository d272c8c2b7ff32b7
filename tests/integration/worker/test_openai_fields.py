"""The worker's answer to the OpenAI fields applications rely on, in-process with a fake engine:
tool calls and structured output shapes, embeddings, and a 400 naming each field it cannot
honour (never a silent drop)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest

from rbee.contracts.openai import MAX_SCHEMA_BYTES, MAX_STOP_CHARS, MAX_TOOLS
from rbee.worker.engines.base import Emit, Outcome, Prompt, SamplingParams
from rbee_testing.fake_engine import FakeEngine

from .test_api import MODEL, assert_openai_error, chat_body, sse_data

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'


class Recording(FakeEngine):
    """Remembers the sampling parameters of each generation."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.params: list[SamplingParams] = []

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        emit: Emit,
        cancelled: asyncio.Event,
        accepted: Callable[[], None],
    ) -> Outcome:
        self.params.append(params)
        return await super().generate(prompt, params, emit, cancelled, accepted)


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"n": 2}, "n"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/chat/completions", {"tools": [{"type": "custom", "custom": {}}]}, "tools[0].type"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"logit_bias": {"999999": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"hello": 5}}, "logit_bias"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "data:,"}},
                        ],
                    }
                ]
            },
            "messages[0].content[1].type",
        ),
        ("/v1/completions", {"n": 3}, "n"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
    ],
)
async def test_a_field_the_worker_cannot_honour_is_400_naming_it(
    make_worker: Any, path: str, fields: dict[str, Any], param: str
) -> None:
    worker = await make_worker()
    base = chat_body() if path == "/v1/chat/completions" else {"model": MODEL, "prompt": "Hi"}
    response = await worker.client.post(path, json={**base, **fields})
    assert response.status_code == 400, response.text
    assert_openai_error(response.json())
    assert response.json()["error"]["param"] == param
    assert (await worker.client.post(path, json=base)).status_code == 200


async def test_fields_that_change_nothing_locally_pass(make_worker: Any) -> None:
    worker = await make_worker()
    response = await worker.client.post(
        "/v1/chat/completions",
        json=chat_body(store=False, metadata={"a": "b"}, service_tier="auto", logit_bias={}),
    )
    assert response.status_code == 200


async def test_a_forced_tool_call_is_an_openai_tool_call_constrained_by_the_schema(
    make_worker: Any,
) -> None:
    engine = Recording(CALL)
    worker = await make_worker(lambda: engine)
    body = chat_body(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    answer = (await worker.client.post("/v1/chat/completions", json=body)).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    schema = engine.params[0].json_schema
    assert schema is not None
    calls = schema["properties"]["tool_calls"]
    assert calls["maxItems"] == 1
    assert calls["items"]["properties"]["arguments"]["required"] == ["city"]


async def test_streamed_tool_calls_come_as_delta_tool_calls(make_worker: Any) -> None:
    worker = await make_worker(lambda: FakeEngine(CALL))
    body = chat_body(tools=[WEATHER], stream=True, stream_options={"include_usage": True})
    response = await worker.client.post("/v1/chat/completions", json=body)
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    opening, arguments = (d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert opening["function"] == {"name": "get_weather", "arguments": ""}
    assert opening["id"].startswith("call_")
    assert "id" not in arguments
    assert json.loads(arguments["function"]["arguments"]) == {"city": "Paris"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_auto_tool_choice_may_answer_in_words(make_worker: Any) -> None:
    worker = await make_worker(lambda: FakeEngine('{"content": "It is sunny."}'))
    answer = (
        await worker.client.post("/v1/chat/completions", json=chat_body(tools=[WEATHER]))
    ).json()
    assert answer["choices"][0]["message"]["content"] == "It is sunny."
    assert "tool_calls" not in answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_a_conversation_with_tool_results_is_accepted(make_worker: Any) -> None:
    worker = await make_worker()
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{}"},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    response = await worker.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [WEATHER]}
    )
    assert response.status_code == 200, response.text


async def test_response_format_constrains_generation_to_the_schema(make_worker: Any) -> None:
    engine = Recording('{"city": "Paris"}')
    worker = await make_worker(lambda: engine)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    answer = await worker.client.post("/v1/chat/completions", json=chat_body(response_format=fmt))
    assert json.loads(answer.json()["choices"][0]["message"]["content"]) == {"city": "Paris"}
    await worker.client.post(
        "/v1/chat/completions", json=chat_body(response_format={"type": "json_object"})
    )
    closed_schema, any_object = (p.json_schema for p in engine.params)
    assert closed_schema == {**schema, "additionalProperties": False}
    assert any_object == {"type": "object"}


async def test_embeddings_come_as_floats_or_base64_one_per_input(make_worker: Any) -> None:
    worker = await make_worker(embedding=True)
    floats = await worker.client.post(
        "/v1/embeddings", json={"model": MODEL, "input": ["a cat", "a dog", "a cat"]}
    )
    assert floats.status_code == 200, floats.text
    body = floats.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    vectors = [d["embedding"] for d in body["data"]]
    assert vectors[0] == vectors[2] != vectors[1]
    assert body["usage"]["prompt_tokens"] == 6
    packed = await worker.client.post(
        "/v1/embeddings", json={"model": MODEL, "input": "a cat", "encoding_format": "base64"}
    )
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vectors[0])
    models = (await worker.client.get("/v1/models")).json()["data"]
    assert models[0]["rbee"]["embedding"] is True


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"dimensions": 4}, "dimensions"),
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": ["fine", ""]}, "input[1]"),
    ],
)
async def test_embedding_fields_the_worker_cannot_honour_are_400(
    make_worker: Any, fields: dict[str, Any], param: str
) -> None:
    worker = await make_worker(embedding=True)
    response = await worker.client.post(
        "/v1/embeddings", json={"model": MODEL, "input": "hello", **fields}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    same = await worker.client.post(
        "/v1/embeddings", json={"model": MODEL, "input": "hello", "dimensions": 8}
    )
    assert same.status_code == 200


async def test_each_worker_refuses_the_other_kind_of_request(make_worker: Any) -> None:
    chat_worker = await make_worker()
    refused = await chat_worker.client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_embedding"
    embedding_worker = await make_worker(embedding=True)
    refused = await embedding_worker.client.post("/v1/chat/completions", json=chat_body())
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_chat"
    assert (await embedding_worker.first_beat()).worker.embedding is True


def schema_with_pattern(pattern: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}}


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema_with_pattern("a" * 3_000_000)},
                }
            },
            "response_format.json_schema.schema",
            f"at most {MAX_SCHEMA_BYTES} are accepted",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": f"f{i}", "parameters": schema_with_pattern("a" * 700)},
                    }
                    for i in range(100)
                ]
            },
            "tools",
            f"at most {MAX_SCHEMA_BYTES} are accepted",
        ),
        ({"tools": [WEATHER] * (MAX_TOOLS + 1)}, "tools", f"at most {MAX_TOOLS} items"),
        ({"stop": ["x" * 1_000_000]}, "stop", f"at most {MAX_STOP_CHARS} are accepted"),
    ],
)
async def test_a_field_past_its_size_limit_is_a_short_400_naming_it(
    make_worker: Any, fields: dict[str, Any], param: str, says: str
) -> None:
    worker = await make_worker()
    response = await worker.client.post("/v1/chat/completions", json=chat_body(**fields))
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert len(response.content) < 2000  # the field is named, never echoed
    assert (await worker.client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_fields_just_within_their_limits_are_served(make_worker: Any) -> None:
    worker = await make_worker(lambda: Recording('{"code": "aaa"}'))
    pattern = "a" * (MAX_SCHEMA_BYTES - 200)
    fields = {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema_with_pattern(pattern)},
        },
        "stop": ["y" * MAX_STOP_CHARS] * 4,
    }
    response = await worker.client.post("/v1/chat/completions", json=chat_body(**fields))
    assert response.status_code == 200, response.text[:500]
