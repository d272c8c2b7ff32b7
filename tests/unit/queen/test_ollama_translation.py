"""Ollama's API translated to OpenAI's and back (rbee.queen.ollama): what an Ollama client
sends becomes the request a worker honours, or a 400 naming what it cannot; the worker's stream
becomes Ollama's lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from rbee.common.errors import BadRequest
from rbee.contracts.ollama import OllamaChatRequest, OllamaEmbedRequest, OllamaGenerateRequest
from rbee.queen.ollama.answers import StreamError, Translation, combine, embed_answer, sse_events
from rbee.queen.ollama.models import ps_entry
from rbee.queen.ollama.requests import chat_body, embed_body, generate_body, load_only


def chat(**fields: Any) -> OllamaChatRequest:
    return OllamaChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_options_become_openai_fields_and_load_time_ones_are_reported() -> None:
    body, ignored = chat_body(
        chat(
            options={
                "num_predict": 12,
                "temperature": 0.2,
                "top_p": 0.5,
                "seed": 3,
                "stop": ["\n"],
                "num_ctx": 8192,
                "top_k": 40,  # what the worker samples with anyway
            },
            keep_alive="10m",
        )
    )
    assert body["max_tokens"] == 12
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.5
    assert body["seed"] == 3
    assert body["stop"] == ["\n"]
    assert body["keep_alive"] == "10m"
    assert body["stream"] is True  # a whole answer is the stream combined
    assert body["stream_options"] == {"include_usage": True}
    assert "top_k" not in body
    assert "num_ctx" not in body
    assert ignored == ["num_ctx"]


def test_no_limit_is_no_max_tokens() -> None:
    body, _ = chat_body(chat(options={"num_predict": -1}))
    assert "max_tokens" not in body


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"top_k": 5}, "options.top_k"),
        ({"repeat_penalty": 1.1}, "options.repeat_penalty"),
        ({"num_predict": 0}, "options.num_predict"),
        ({"unheard_of": 1}, "options.unheard_of"),
    ],
)
def test_what_a_worker_cannot_honour_is_refused_by_name(
    options: dict[str, Any], named: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        chat_body(chat(options=options))
    assert caught.value.param == named
    assert named.split(".")[1] in caught.value.message


def test_format_json_and_schema() -> None:
    assert chat_body(chat(format="json"))[0]["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = chat_body(chat(format=schema))[0]["response_format"]
    assert fmt == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    assert "response_format" not in chat_body(chat(format=""))[0]
    with pytest.raises(BadRequest):
        chat_body(chat(format="yaml"))


def test_tool_history_gets_ids_that_pair_calls_with_results() -> None:
    request = chat(
        messages=[
            {"role": "user", "content": "weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "time", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "12:00", "tool_name": "time"},
            {"role": "tool", "content": "sunny", "tool_name": "weather"},
        ],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    )
    body, _ = chat_body(request)
    assistant, time_result, weather_result = body["messages"][1:]
    weather_call, time_call = assistant["tool_calls"]
    assert json.loads(weather_call["function"]["arguments"]) == {"city": "Paris"}
    assert time_result["tool_call_id"] == time_call["id"]
    assert weather_result["tool_call_id"] == weather_call["id"]
    assert weather_call["id"] != time_call["id"]
    assert body["tools"] == request.tools


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
            "messages[0].images",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"think": True}, "think"),
    ],
)
def test_chat_refusals(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        chat_body(chat(**fields))
    assert caught.value.param == param


def test_generate_goes_through_the_chat_template_unless_raw() -> None:
    asked = OllamaGenerateRequest.model_validate({"model": "m", "prompt": "Hi", "system": "Be"})
    path, body, _ = generate_body(asked)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "Be"},
        {"role": "user", "content": "Hi"},
    ]
    raw = OllamaGenerateRequest.model_validate({"model": "m", "prompt": "Hi", "raw": True})
    path, body, _ = generate_body(raw)
    assert path == "/v1/completions"
    assert body["prompt"] == "Hi"


@pytest.mark.parametrize("field", ["suffix", "template", "context", "images"])
def test_generate_refuses_what_it_cannot_do(field: str) -> None:
    value: Any = [1] if field in ("context", "images") else "x"
    asked = OllamaGenerateRequest.model_validate({"model": "m", "prompt": "Hi", field: value})
    with pytest.raises(BadRequest) as caught:
        generate_body(asked)
    assert caught.value.param == field


def test_an_empty_prompt_only_loads() -> None:
    assert load_only(OllamaGenerateRequest.model_validate({"model": "m"}))
    assert not load_only(OllamaGenerateRequest.model_validate({"model": "m", "prompt": "x"}))
    assert load_only(OllamaChatRequest.model_validate({"model": "m"}))


def test_embed_body() -> None:
    asked = OllamaEmbedRequest.model_validate(
        {"model": "m", "input": ["a", "b"], "options": {"num_ctx": 512}, "keep_alive": 0}
    )
    body, ignored = embed_body(asked)
    assert body == {"model": "m", "input": ["a", "b"], "encoding_format": "float", "keep_alive": 0}
    assert ignored == ["num_ctx"]
    answer = {
        "data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    out = embed_answer("m", answer, 1000)
    assert out["embeddings"] == [[1.0, 0.0], [0.0, 1.0]]
    assert out["prompt_eval_count"] == 4


def sse(*events: dict[str, Any] | str) -> list[bytes]:
    text = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    # Cut into pieces that split events and lines, as a network does.
    raw = (": loading m\n\n" + text).encode()
    return [raw[i : i + 7] for i in range(0, len(raw), 7)]


async def chunks_of(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


async def translate(kind: Any, pieces: list[bytes], cold: bool = False) -> list[dict[str, Any]]:
    translation = Translation("m", kind, started_ns=0, cold=cold, now=datetime.now(UTC))
    lines: list[dict[str, Any]] = []
    clock = iter(range(100, 10_000, 100))
    async for data in sse_events(chunks_of(pieces)):
        lines += translation.event(data, next(clock))
    return lines + translation.end(5_000)


async def test_a_chat_stream_becomes_ollama_lines_with_counts_and_durations() -> None:
    pieces = sse(
        delta(role="assistant", content=""),
        delta(content="Hel"),
        delta(content="lo"),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
        "[DONE]",
    )
    lines = await translate("chat", pieces, cold=True)
    assert [line["message"]["content"] for line in lines] == ["Hel", "lo", ""]
    assert [line["done"] for line in lines] == [False, False, True]
    done = lines[-1]
    assert done["done_reason"] == "length"
    assert done["prompt_eval_count"] == 7
    assert done["eval_count"] == 2
    assert done["total_duration"] == 5_000
    # The first event came at 100 (the load, the model being cold), the first text at 200.
    assert done["load_duration"] == 100
    assert done["prompt_eval_duration"] == 100
    assert done["eval_duration"] == 4_800
    whole = combine(lines)
    assert whole["message"] == {"role": "assistant", "content": "Hello"}
    assert whole["done"] is True


async def test_streamed_tool_calls_come_whole_with_object_arguments() -> None:
    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "weather"}}
    pieces = sse(
        delta(role="assistant", content=None, tool_calls=[call]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        "[DONE]",
    )
    lines = await translate("chat", pieces)
    calls = [{"function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}}]
    assert lines[0]["message"]["tool_calls"] == calls
    assert lines[-1]["done_reason"] == "stop"
    assert combine(lines)["message"]["tool_calls"] == calls


async def test_generate_lines_carry_response() -> None:
    pieces = sse({"choices": [{"index": 0, "text": "Par"}]}, {"choices": [{"text": "is"}]})
    lines = await translate("generate", pieces)
    assert [line["response"] for line in lines] == ["Par", "is", ""]
    assert combine(lines)["response"] == "Paris"


async def test_an_error_event_keeps_its_status() -> None:
    error = {"error": {"message": "no room", "type": "rate_limit_error", "code": "queue_full"}}
    with pytest.raises(StreamError) as caught:
        await translate("chat", sse(error))
    assert caught.value.status == 429
    assert caught.value.message == "no room"


def test_ps_entry_says_when_the_model_unloads() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    entry = ps_entry("m", None, {"keep_alive_left_s": 90.0}, False, now)
    assert entry["expires_at"] == "2026-01-01T00:01:30Z"
    pinned = ps_entry("m", None, {"keep_alive_left_s": None}, True, now)
    assert pinned["expires_at"].startswith("2318")
    assert pinned["size_vram"] == pinned["size"]
