"""OpenAI's Responses API through the queen (issue 25), with the official `openai` SDK and the
OpenAI Agents SDK against a real SmolLM2 worker: plain and streamed responses, a function tool,
a JSON-schema text format, and an agent with one function tool run to completion through the
queen with the Agents SDK's Responses model and with its chat-completions model.

The model is tiny: the tests check the protocol and that what must fit a schema fits it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from rbee.common.bundled import DEFAULT_MODEL

from .conftest import Cluster

pytestmark = pytest.mark.e2e

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": WEATHER_PARAMETERS,
    "strict": True,
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
    "required": ["name", "country"],
    "additionalProperties": False,
}


@pytest.fixture
def cluster(apps_cluster: Cluster) -> Cluster:
    return apps_cluster


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{cluster.queen_url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def test_responses_create_answers_with_output_text(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=DEFAULT_MODEL,
        input="What is the capital of France?",
        instructions="Answer in one short sentence.",
        max_output_tokens=24,
        temperature=0,
    )
    assert response.object == "response"
    assert response.model == DEFAULT_MODEL
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert 0 < response.usage.output_tokens <= 24


def test_a_streamed_response_arrives_event_by_event(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model=DEFAULT_MODEL,
        input="What is the capital of France?",
        max_output_tokens=24,
        temperature=0,
        stream=True,
    )
    kinds, deltas = [], []
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert len(deltas) > 1, "the text comes as it is made, piece by piece"
    assert "".join(deltas).strip()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_required_function_tool_is_a_function_call_that_fits_the_schema(
    client: openai.OpenAI, streamed: bool
) -> None:
    asked: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "input": "What is the weather in Paris?",
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,  # one call: the tiny model would repeat it to the limit
        "max_output_tokens": 120,
        "temperature": 0,
    }
    if streamed:
        with client.responses.stream(**asked) as stream:
            response = stream.get_final_response()
    else:
        response = client.responses.create(**asked)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) >= 1, response.output
    assert calls[0].name == "get_weather"
    assert calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_PARAMETERS)


def test_a_json_schema_text_format_gives_json_that_fits(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=DEFAULT_MODEL,
        input="Name a city and its country.",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA}},
        max_output_tokens=80,
        temperature=0,
    )
    jsonschema.validate(json.loads(response.output_text), CITY_SCHEMA)


def test_a_field_no_worker_can_honour_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=DEFAULT_MODEL, input="Hi", previous_response_id="resp_123", max_output_tokens=5
        )
    assert "previous_response_id" in str(caught.value)


def test_input_tokens_are_counted(cluster: Cluster) -> None:
    def count(text: str) -> int:
        answer = httpx.post(
            f"{cluster.queen_url}/v1/responses/input_tokens",
            json={"model": DEFAULT_MODEL, "input": text},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        tokens: int = answer.json()["input_tokens"]
        return tokens

    assert 0 < count("Hi") < count("Hi there, how are you doing today? " * 5)


# ---- the OpenAI Agents SDK ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["responses", "chat_completions"])
def test_an_agent_with_a_function_tool_runs_to_completion(cluster: Cluster, kind: str) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # no network: traces would go to OpenAI
    called: list[dict[str, str]] = []

    @agents.function_tool
    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city.

        Args:
            city: The city.
            unit: celsius or fahrenheit.
        """
        called.append({"city": city, "unit": unit})
        return weather_answer(city, unit)

    async def run() -> Any:
        async with openai.AsyncOpenAI(
            base_url=f"{cluster.queen_url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as sdk:
            model: Any
            if kind == "responses":
                model = agents.OpenAIResponsesModel(model=DEFAULT_MODEL, openai_client=sdk)
            else:
                model = agents.OpenAIChatCompletionsModel(model=DEFAULT_MODEL, openai_client=sdk)
            agent = agents.Agent(
                name="weather",
                instructions="Use the get_weather tool to answer.",
                model=model,
                tools=[get_weather],
                # The tiny model must call the tool, once; its result is the run's answer.
                model_settings=agents.ModelSettings(
                    tool_choice="required", parallel_tool_calls=False, temperature=0
                ),
                tool_use_behavior="stop_on_first_tool",
            )
            return await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3)

    result = asyncio.run(run())
    assert len(called) == 1, called
    assert result.final_output == weather_answer(called[0]["city"], called[0]["unit"])


def weather_answer(city: str, unit: str) -> str:
    return f"21 degrees {unit} and sunny in {city}"
