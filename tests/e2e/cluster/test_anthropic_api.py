"""Anthropic's Messages API through the queen, with the official `anthropic` SDK and a real
SmolLM2 worker (issue 25): plain and streamed answers, a forced tool call whose input fits the
tool's schema, counting tokens, and the SDK's own exceptions for a bad key and an unknown model.

The model is tiny: the tests check the protocol and the schema, not what it says.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import pytest

from rbee.common.bundled import DEFAULT_MODEL
from rbee_testing.processes import ServerProcess, console_script, free_port

from .conftest import Cluster

pytestmark = pytest.mark.e2e

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COLD = {"temperature": 0}  # the SDK has no parameter for it any more; the API still takes it


@pytest.fixture
def cluster(apps_cluster: Cluster) -> Cluster:
    return apps_cluster


@pytest.fixture
def client(cluster: Cluster) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=cluster.queen_url, api_key="unused", max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def test_messages_create_answers_in_anthropic_shape(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=24,
        messages=QUESTION,
        extra_body=COLD,  # type: ignore[arg-type]
    )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == DEFAULT_MODEL, "named by the model id, not llama.cpp's file path"
    assert message.content
    assert message.content[0].type == "text"
    assert message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens <= 24


def test_a_streamed_message_arrives_event_by_event(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=DEFAULT_MODEL,
        max_tokens=24,
        messages=QUESTION,
        extra_body=COLD,  # type: ignore[arg-type]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert "message_delta" in kinds
    text = "".join(block.text for block in final.content if block.type == "text")
    assert text.strip(), final
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("streamed", [False, True])
def test_a_forced_tool_call_is_a_tool_use_block_that_fits_the_schema(
    client: anthropic.Anthropic, streamed: bool
) -> None:
    asked = {
        "model": DEFAULT_MODEL,
        "max_tokens": 120,
        "extra_body": COLD,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    if streamed:
        with client.messages.stream(**asked) as stream:  # type: ignore[arg-type]
            message = stream.get_final_message()
    else:
        message = client.messages.create(**asked)  # type: ignore[arg-type]
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1, message.content
    assert uses[0].name == "get_weather"
    assert uses[0].id
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])


def test_a_tool_result_turn_is_answered(client: anthropic.Anthropic) -> None:
    """The conversation after a call: the tool's result goes back as a tool_result block."""
    message = client.messages.create(
        model=DEFAULT_MODEL,
        max_tokens=30,
        extra_body=COLD,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris", "unit": "celsius"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"}],
            },
        ],
    )
    assert message.content
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_count_tokens_counts_the_prompt(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model=DEFAULT_MODEL, messages=QUESTION)  # type: ignore[arg-type]
    longer = client.messages.count_tokens(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France? " * 10}],
    )
    assert 0 < short.input_tokens < longer.input_tokens


def test_an_unknown_model_is_the_sdks_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=5, messages=QUESTION)  # type: ignore[arg-type]
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "no-such-model" in body["error"]["message"]


def test_a_field_the_worker_cannot_honour_is_a_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=DEFAULT_MODEL,
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "document", "source": {"type": "text", "data": "x"}}],
                }
            ],  # type: ignore[list-item]
            tools=[WEATHER],  # type: ignore[list-item]
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_structured_output_is_refused_not_dropped(client: anthropic.Anthropic) -> None:
    """llama.cpp's Messages API would answer as if `output_config` had not been sent."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=DEFAULT_MODEL,
            max_tokens=5,
            messages=[{"role": "user", "content": "Capital of France?"}],
            extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}},
        )
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert "output_config" in error["message"]


def test_models_list_says_which_apis_each_model_serves(cluster: Cluster) -> None:
    models = httpx.get(f"{cluster.queen_url}/v1/models", timeout=30).json()["data"]
    card = next(m for m in models if m["id"] == DEFAULT_MODEL)
    assert {"chat.completions", "messages", "responses", "embeddings"} <= set(card["rbee"]["apis"])


@pytest.fixture
def guarded_queen(tmp_path: Path) -> Iterator[str]:
    """A queen with a cluster token (no hive needed: the key is refused before routing)."""
    port = free_port()
    queen = ServerProcess(
        [console_script("queen-rbee"), "--port", str(port), "--data-dir", str(tmp_path)],
        health_url=f"http://127.0.0.1:{port}/health",
        env={"RBEE_TOKEN": "e2e-anthropic-token"},
    )
    with queen:
        yield f"http://127.0.0.1:{port}"


def test_a_bad_key_is_the_sdks_authentication_error(guarded_queen: str) -> None:
    with (
        anthropic.Anthropic(base_url=guarded_queen, api_key="wrong", max_retries=0) as sdk,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        sdk.messages.create(model=DEFAULT_MODEL, max_tokens=5, messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # The cluster token as x-api-key passes the gate: the model is then simply not there.
    with (
        anthropic.Anthropic(
            base_url=guarded_queen, api_key="e2e-anthropic-token", max_retries=0
        ) as sdk,
        pytest.raises(anthropic.NotFoundError),
    ):
        sdk.messages.create(model=DEFAULT_MODEL, max_tokens=5, messages=QUESTION)  # type: ignore[arg-type]
