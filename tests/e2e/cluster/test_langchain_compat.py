"""A second, independent client against the queen: LangChain's OpenAI integration, as agents and
RAG pipelines use it (structured output both ways, bound tools, streamed tool calls,
embeddings). Only the shapes are checked: the model is tiny."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, SecretStr

from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT

from .conftest import Cluster

pytestmark = pytest.mark.e2e


class City(BaseModel):
    """A city and the country it is in."""

    name: str
    country: str


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """LangChain's own default client lives until the interpreter ends, unclosed."""
    with httpx.Client(timeout=120) as client:
        yield client


def chat(cluster: Cluster, http: httpx.Client, **fields: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{cluster.queen_url}/v1",
        api_key=SecretStr("unused"),
        model=DEFAULT_MODEL,
        temperature=0,
        max_retries=0,
        http_client=http,
        **fields,
    )


def ask(text: str) -> list[tuple[str, str]]:
    return [("system", DEFAULT_SYSTEM_PROMPT), ("human", text)]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_model(
    apps_cluster: Cluster, http: httpx.Client, method: str
) -> None:
    structured = chat(apps_cluster, http, max_completion_tokens=100).with_structured_output(
        City, method=method
    )
    answer = structured.invoke(ask("Which city is the capital of France, as JSON?"))
    assert isinstance(answer, City)


def test_bind_tools_gives_tool_calls_with_arguments(
    apps_cluster: Cluster, http: httpx.Client
) -> None:
    llm = chat(apps_cluster, http, max_completion_tokens=100).bind_tools(
        [GetWeather], tool_choice="GetWeather"
    )
    message = llm.invoke(ask("What is the weather in Paris?"))
    [call] = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    assert call["id"]


def test_streamed_tool_calls_are_assembled(apps_cluster: Cluster, http: httpx.Client) -> None:
    # One call is what this test reads back: ask for one. (With parallel calls allowed, the
    # tiny model, decoding greedily, may call the same function again and again.)
    llm = chat(apps_cluster, http, max_completion_tokens=100).bind_tools(
        [GetWeather], tool_choice="any", parallel_tool_calls=False
    )
    whole: AIMessageChunk | None = None
    for chunk in llm.stream(ask("What is the weather in Rome?")):
        assert isinstance(chunk, AIMessageChunk)
        whole = chunk if whole is None else whole + chunk
    assert whole is not None
    [call] = whole.tool_calls
    GetWeather.model_validate(call["args"])


def test_embeddings_for_a_rag_pipeline(apps_cluster: Cluster, http: httpx.Client) -> None:
    # LangChain sends OpenAI's token ids unless told not to: they mean nothing to another model.
    embeddings = OpenAIEmbeddings(
        base_url=f"{apps_cluster.queen_url}/v1",
        api_key=SecretStr("unused"),
        model=DEFAULT_MODEL,
        check_embedding_ctx_length=False,
        max_retries=0,
        http_client=http,
    )
    documents = embeddings.embed_documents(["Paris is in France.", "Rome is in Italy."])
    query = embeddings.embed_query("Paris is in France.")
    assert [len(d) for d in documents] == [576, 576]
    assert query == pytest.approx(documents[0], abs=1e-6)
