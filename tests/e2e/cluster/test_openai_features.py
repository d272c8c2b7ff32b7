"""What applications call besides plain chat, end to end through the queen with the official
`openai` client and real SmolLM2 workers: structured output, tool calls, logprobs, seeds,
embeddings, and a 400 naming each field that cannot be honoured (issue 16).

The model is tiny: the tests check the shapes and guarantees a client relies on (the answer
parses, validates, repeats), not the quality of what it says.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT

from .conftest import Cluster

pytestmark = pytest.mark.e2e
SYSTEM = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}


class City(BaseModel):
    name: str
    country: str
    population: int


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str
    unit: str


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")


@pytest.fixture
def cluster(apps_cluster: Cluster) -> Cluster:
    return apps_cluster


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{cluster.queen_url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def ask(text: str) -> list[Any]:
    return [SYSTEM, {"role": "user", "content": text}]


def test_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=DEFAULT_MODEL,
        messages=ask("Describe Paris as JSON: its name, country and population."),
        response_format=City,
        temperature=0,
        max_tokens=120,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City)
    assert parsed.name
    with client.chat.completions.stream(
        model=DEFAULT_MODEL,
        messages=ask("Describe Rome as JSON: its name, country and population."),
        response_format=City,
        temperature=0,
        max_tokens=120,
    ) as stream:
        streamed = stream.get_final_completion().choices[0].message.parsed
    assert isinstance(streamed, City)


def test_json_object_answers_parse_streamed_too(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ask("Give the capital of France as a JSON object."),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_a_forced_tool_call_has_arguments_that_validate(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ask("What is the weather in Paris?"),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=120,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    GetWeather.model_validate_json(call.function.arguments)


def test_streamed_tool_calls_are_assembled_by_the_sdk(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=DEFAULT_MODEL,
        messages=ask("What is the weather in Rome, in celsius?"),
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
    ) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_results_sent_back_are_answered(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        *ask("What is the weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=60
    )
    message = completion.choices[0].message
    assert message.content or message.tool_calls


def test_logprobs_are_real_log_probabilities(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ask("What is the capital of France?"),
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    content = completion.choices[0].logprobs and completion.choices[0].logprobs.content
    assert content
    assert completion.usage is not None
    assert len(content) == completion.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        tops = [t.logprob for t in token.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy decoding picks the most likely token.
        assert token.logprob == pytest.approx(tops[0])
    assert "".join(t.token for t in content) == completion.choices[0].message.content
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ask("What is the capital of France?"),
        temperature=0,
        max_tokens=8,
        logprobs=True,
        stream=True,
    )
    streamed = [
        token
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for token in chunk.choices[0].logprobs.content or []
    ]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=ask("Tell me a short story."),
            temperature=1.0,
            max_tokens=24,
            seed=seed,
        )
        return completion.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert {sample(s) for s in (1, 2, 3)} != {first}


def test_sampling_fields_as_openai_defines_them(client: openai.OpenAI) -> None:
    stopped = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ask("What is the capital of France?"),
        temperature=0,
        stop=["Paris", "paris"],
        presence_penalty=0.5,
        frequency_penalty=0.5,
        max_completion_tokens=40,
    )
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"
    # Greedy, so the answer cannot end by chance before its third token.
    short = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ask("Count to twenty."),
        temperature=0,
        max_completion_tokens=3,
    )
    assert short.usage is not None
    assert short.usage.completion_tokens <= 3
    assert short.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=ask("Hi"),
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1


def test_two_choices_are_a_400_naming_n(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=ask("Hi"), n=2)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "n"


def test_embeddings_have_the_right_count_and_dimension(
    client: openai.OpenAI, cluster: Cluster
) -> None:
    texts = ["The cat sat on the mat.", "Stock markets fell sharply.", "The cat sat on the mat."]
    # The SDK asks for base64 by default and decodes it.
    packed = client.embeddings.create(model=DEFAULT_MODEL, input=texts)
    vectors = [d.embedding for d in packed.data]
    assert len(vectors) == 3
    assert {len(v) for v in vectors} == {576}
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert math.sqrt(sum(x * x for x in vectors[0])) == pytest.approx(1.0, abs=1e-3)
    floats = client.embeddings.create(model=DEFAULT_MODEL, input=texts[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    assert packed.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=DEFAULT_MODEL, input="hi", dimensions=64)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "dimensions"
    models = httpx.get(f"{cluster.queen_url}/v1/models").json()["data"]
    [card] = [m for m in models if m["id"] == DEFAULT_MODEL]
    assert card["rbee"]["embedding"] is True
    assert (card["rbee"]["workers"], card["rbee"]["embedding_workers"]) == (2, 1)
