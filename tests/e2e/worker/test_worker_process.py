"""The real SmolLM2 worker process next to a real queen: registration, answers, streaming."""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from rbee.common.bundled import DEFAULT_SYSTEM_PROMPT

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def test_worker_registers_with_the_queen_and_turns_ready(
    queen_module: Any, smollm_worker: Any
) -> None:
    deadline = time.monotonic() + 5
    while True:
        response = httpx.get(f"{queen_module.url}/v1/workers/{smollm_worker.id}")
        if response.status_code == 200 and response.json()["status"] == "ready":
            break
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)
    info = response.json()
    assert info["model_id"] == MODEL
    assert (info["host"], info["port"]) == ("127.0.0.1", smollm_worker.port)
    assert (info["slots"], info["in_flight"]) == (1, 0)
    assert info["implementation"] == "llm-worker-rbee"
    health = httpx.get(f"{smollm_worker.url}/health").json()
    assert health["status"] == "ok"


def test_capital_of_france_is_paris_through_the_openai_client(smollm_worker: Any) -> None:
    client = openai.OpenAI(base_url=f"{smollm_worker.url}/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL,
        # See DEFAULT_SYSTEM_PROMPT for why a system message is sent.
        messages=[
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    assert answer.usage.prompt_tokens > 5
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_streaming_yields_several_chunks_then_done(smollm_worker: Any) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
    }
    data: list[str] = []
    with httpx.stream(
        "POST", f"{smollm_worker.url}/v1/chat/completions", json=body, timeout=30
    ) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([c for c in content if c]) >= 3
    assert "Paris" in "".join(c or "" for c in content)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_streams_text_completions(smollm_worker: Any) -> None:
    client = openai.OpenAI(base_url=f"{smollm_worker.url}/v1", api_key="none", max_retries=0)
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text.startswith(" Paris")


def test_health_stays_fast_during_a_long_generation(smollm_worker: Any) -> None:
    generating = threading.Event()
    finished = threading.Event()
    chunks: list[float] = []

    def generate() -> None:
        body = {
            "model": MODEL,
            # Greedy counting runs to its token limit (a story may end sooner).
            "prompt": "1, 2, 3, 4, 5,",
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{smollm_worker.url}/v1/completions", json=body, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(time.monotonic())
                    generating.set()
        finished.set()

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        assert generating.wait(20)
        timings: list[float] = []
        with httpx.Client(base_url=smollm_worker.url, timeout=5) as client:
            for _ in range(15):
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                timings.append(time.perf_counter() - started)
                time.sleep(0.02)
        measured_until = time.monotonic()
    finally:
        thread.join(60)
    # The generation was still producing tokens after the last health check.
    assert any(t > measured_until for t in chunks), "generation ended too soon to measure"
    assert statistics.median(timings) < 0.1, timings


def test_logit_bias_steers_the_real_model_and_completions_report_logprobs(
    smollm_worker: Any,
) -> None:
    def complete(**fields: Any) -> dict[str, Any]:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4}
        response = httpx.post(
            f"{smollm_worker.url}/v1/completions", json={**body, **fields}, timeout=60
        )
        assert response.status_code == 200, response.text
        choice: dict[str, Any] = response.json()["choices"][0]
        return choice

    plain = complete(temperature=0, logprobs=2)
    logprobs = plain["logprobs"]
    assert "".join(logprobs["tokens"]) == plain["text"]
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    # A +100 bias makes one token the only choice at every step.
    forced = complete(temperature=0, logprobs=0, logit_bias={"1000": 100})
    tokens = forced["logprobs"]["tokens"]
    assert len(tokens) == 4
    assert len(set(tokens)) == 1
    assert forced["text"] != plain["text"]


@pytest.mark.parametrize("field", ["response_format", "tools"])
def test_a_schema_llama_cpp_cannot_express_is_400_naming_its_field(
    smollm_worker: Any, field: str
) -> None:
    schema = {"type": "object", "properties": {"x": {"$ref": "#/definitions/missing"}}}
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if field == "tools":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        body["tool_choice"] = "required"
    else:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema},
        }
    refused = httpx.post(f"{smollm_worker.url}/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == field
    assert refused.json()["error"]["code"] == "invalid_schema"


def test_a_3_mb_json_schema_pattern_is_a_quick_400_and_the_worker_keeps_serving(
    queen_module: Any, smollm_worker: Any
) -> None:
    """It used to be echoed into llama-server's log, whose reader died on the long line: the
    server blocked on a full pipe and the worker's slot was lost for good."""
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^" + "a" * 3_000_000 + "$"}},
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give me a code."}],
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    }
    for url in (queen_module.url, smollm_worker.url):
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 400, refused.text[:300]
        assert refused.json()["error"]["param"] == "response_format.json_schema.schema"
        assert len(refused.content) < 2000
    plain = {**body, "response_format": None, "temperature": 0}
    for _ in range(2):  # more than its one slot: none was lost
        answer = httpx.post(f"{queen_module.url}/v1/chat/completions", json=plain, timeout=60)
        assert answer.status_code == 200, answer.text
    assert httpx.get(f"{smollm_worker.url}/health").json()["in_flight"] == 0
