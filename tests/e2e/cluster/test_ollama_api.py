"""Ollama's API on the queen, end to end with the official `ollama` client and real SmolLM2
workers started through the queen's jobs (issue 25): the models listed, loaded and shown, chat
plain and streamed, generate, embed, structured output from a JSON schema, and Ollama-shaped
errors. The model is tiny: the shapes and guarantees a client relies on are checked, not what
it says."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import ollama
import pytest
from pydantic import BaseModel

from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT

from .conftest import Cluster

pytestmark = pytest.mark.e2e
SYSTEM = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
GREEDY = {"temperature": 0, "num_predict": 24, "seed": 7}


class City(BaseModel):
    name: str
    country: str


@pytest.fixture
def client(apps_cluster: Cluster) -> Iterator[ollama.Client]:
    with ollama.Client(host=apps_cluster.queen_url, timeout=180) as c:
        yield c


def ask(text: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": text}]


def test_list_shows_the_served_model(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert DEFAULT_MODEL in names
    [entry] = [m for m in client.list().models if m.model == DEFAULT_MODEL]
    assert entry.size is not None
    assert entry.size > 50_000_000
    assert entry.details is not None
    assert entry.details.format == "gguf"


def test_ps_shows_the_loaded_model_and_when_it_unloads(client: ollama.Client) -> None:
    [entry] = [m for m in client.ps().models if m.model == DEFAULT_MODEL]
    assert entry.expires_at is not None
    assert entry.size_vram == 0  # CPU workers


def test_show_and_an_unknown_model(client: ollama.Client) -> None:
    shown = client.show(DEFAULT_MODEL)
    assert shown.capabilities is not None
    assert "completion" in shown.capabilities
    assert shown.modelinfo is not None
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404
    assert "no-such-model" in caught.value.error


def test_version(apps_cluster: Cluster) -> None:
    answer = httpx.get(f"{apps_cluster.queen_url}/api/version").json()
    assert isinstance(answer["version"], str)
    assert answer["version"]


def test_chat_plain_has_ollama_counts_and_durations(client: ollama.Client) -> None:
    answer = client.chat(DEFAULT_MODEL, messages=ask("Name a colour."), options=GREEDY)
    assert answer.done is True
    assert answer.message.role == "assistant"
    assert isinstance(answer.message.content, str)
    assert answer.message.content.strip()
    assert answer.done_reason in ("stop", "length")
    assert answer.prompt_eval_count
    assert answer.prompt_eval_count > 5
    assert answer.eval_count
    assert 0 < answer.eval_count <= 24
    assert answer.total_duration
    assert answer.total_duration > 0


def test_chat_streamed_gives_the_same_text_in_pieces(client: ollama.Client) -> None:
    whole = client.chat(DEFAULT_MODEL, messages=ask("Count to five."), options=GREEDY)
    parts = list(
        client.chat(DEFAULT_MODEL, messages=ask("Count to five."), options=GREEDY, stream=True)
    )
    assert len(parts) > 2
    assert all(p.done is False for p in parts[:-1])
    last = parts[-1]
    assert last.done is True
    assert last.eval_count == whole.eval_count
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_num_predict_limits_the_answer(client: ollama.Client) -> None:
    answer = client.chat(
        DEFAULT_MODEL,
        messages=ask("Tell me a long story about a dragon."),
        options={"temperature": 0, "num_predict": 3},
    )
    assert answer.eval_count == 3
    assert answer.done_reason == "length"


def test_generate(client: ollama.Client) -> None:
    answer = client.generate(DEFAULT_MODEL, "The capital of France is", options=GREEDY)
    assert answer.done is True
    assert answer.response
    assert answer.response.strip()
    assert answer.eval_count
    assert answer.eval_count > 0
    streamed = list(
        client.generate(DEFAULT_MODEL, "The capital of France is", options=GREEDY, stream=True)
    )
    assert "".join(p.response or "" for p in streamed) == answer.response


def test_embed(client: ollama.Client) -> None:
    answer = client.embed(DEFAULT_MODEL, input=["a cat", "a dog", "a cat"])
    assert len(answer.embeddings) == 3
    dims = {len(v) for v in answer.embeddings}
    assert dims == {576}  # SmolLM2-135M's hidden size
    assert answer.embeddings[0] == pytest.approx(answer.embeddings[2], abs=1e-5)
    assert answer.embeddings[0] != pytest.approx(answer.embeddings[1], abs=1e-3)


def test_chat_with_a_json_schema_format_answers_what_fits(client: ollama.Client) -> None:
    answer = client.chat(
        DEFAULT_MODEL,
        messages=ask("Which city is the capital of France? Answer as JSON."),
        format=City.model_json_schema(),
        options={"temperature": 0, "num_predict": 60},
    )
    city = City.model_validate_json(answer.message.content or "")
    assert city.name


def test_chat_with_format_json_answers_json(client: ollama.Client) -> None:
    answer = client.chat(
        DEFAULT_MODEL,
        messages=ask('Answer with a JSON object with one key, "colour": the colour of grass.'),
        format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    assert answer.done_reason == "stop", answer.message.content  # the object closed in time
    assert isinstance(json.loads(answer.message.content or ""), dict)


def test_what_cannot_be_honoured_is_a_400_naming_it(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(DEFAULT_MODEL, messages=ask("Hi"), options={"top_k": 5})
    assert caught.value.status_code == 400
    assert "top_k" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat("no-such-model", messages=ask("Hi"))
    assert caught.value.status_code == 404


def test_an_empty_prompt_loads_the_model(client: ollama.Client) -> None:
    answer = client.generate(DEFAULT_MODEL, "")
    assert answer.done is True
    assert answer.done_reason == "load"
