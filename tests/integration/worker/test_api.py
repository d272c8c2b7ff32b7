"""The worker's OpenAI API in-process, with a fake engine: shapes, errors, auth."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from rbee_testing.fake_engine import FakeEngine

MODEL = "fake-model"  # the conftest's worker serves it under this name


def chat_body(content: str = "What is the capital of France?", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def assert_openai_error(body: dict[str, Any], code: str | None = None) -> None:
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


class LoadingHost:
    """An engine host that loads until told it has loaded, without holding up the worker (as
    llama-server's process loads beside it)."""

    def __init__(self) -> None:
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        await self.loaded.wait()

    async def failure(self) -> str:
        await asyncio.Event().wait()  # it never dies here
        return ""

    async def close(self) -> None:
        self.loaded.set()


async def test_health_says_loading_until_the_model_is_loaded(make_worker: Any) -> None:
    host = LoadingHost()
    worker = await make_worker(engine_host=host, wait_ready=False)
    loading = await worker.client.get("/health")
    assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
    early = await worker.client.post("/v1/chat/completions", json=chat_body())
    assert early.status_code == 503
    assert_openai_error(early.json(), "model_loading")
    host.loaded.set()
    await worker.wait_ready()
    body = (await worker.client.get("/health")).json()
    assert body["status"] == "ok"
    assert body["model"] == MODEL


async def test_chat_completion_answers_in_openai_shape_with_usage(make_worker: Any) -> None:
    worker = await make_worker()
    response = await worker.client.post("/v1/chat/completions", json=chat_body(temperature=0))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Paris is the capital of France.",
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


async def test_streamed_chat_is_role_then_content_then_finish_then_done(make_worker: Any) -> None:
    worker = await make_worker()
    response = await worker.client.post(
        "/v1/chat/completions",
        json=chat_body(stream=True, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(content) == 6
    assert "".join(content) == "Paris is the capital of France."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


async def test_text_completion_whole_and_streamed(make_worker: Any) -> None:
    worker = await make_worker()
    whole = await worker.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "The capital", "max_tokens": 3}
    )
    assert whole.status_code == 200
    body = whole.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0] == {
        "index": 0,
        "text": "Paris is the",
        "finish_reason": "length",
        "logprobs": None,
    }
    assert body["usage"]["completion_tokens"] == 3
    streamed = await worker.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "The capital", "stream": True}
    )
    data = sse_data(streamed.text)
    assert data[-1] == "[DONE]"
    texts = [json.loads(d)["choices"][0]["text"] for d in data[:-1]]
    assert "".join(texts) == "Paris is the capital of France."


async def test_max_tokens_and_stop_are_obeyed(make_worker: Any) -> None:
    worker = await make_worker()
    limited = await worker.client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert limited.json()["choices"][0]["message"]["content"] == "Paris is"
    assert limited.json()["choices"][0]["finish_reason"] == "length"
    stopped = await worker.client.post("/v1/chat/completions", json=chat_body(stop=" capital"))
    assert stopped.json()["choices"][0]["message"]["content"] == "Paris is the"
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"


async def test_models_lists_the_one_model(make_worker: Any) -> None:
    worker = await make_worker()
    body = (await worker.client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]


async def test_bad_requests_get_openai_errors_and_the_worker_carries_on(make_worker: Any) -> None:
    worker = await make_worker()
    bad_bodies: list[Any] = [
        {"model": MODEL},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": "hello"},
        chat_body(max_tokens="many"),
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        chat_body(temperature=-1),
    ]
    for body in bad_bodies:
        response = await worker.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, body
        assert_openai_error(response.json())
    not_json = await worker.client.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    assert_openai_error(not_json.json())
    fine = await worker.client.post("/v1/chat/completions", json=chat_body())
    assert fine.status_code == 200


async def test_unknown_extra_fields_are_accepted(make_worker: Any) -> None:
    worker = await make_worker()
    response = await worker.client.post(
        "/v1/chat/completions", json=chat_body(logit_bias={}, some_vendor_flag=True)
    )
    assert response.status_code == 200


async def test_another_model_name_is_404_model_not_found(make_worker: Any) -> None:
    worker = await make_worker()
    response = await worker.client.post(
        "/v1/chat/completions", json={**chat_body(), "model": "gpt-4"}
    )
    assert response.status_code == 404
    assert_openai_error(response.json(), "model_not_found")


async def test_prompt_longer_than_the_context_is_400_saying_so(make_worker: Any) -> None:
    worker = await make_worker(lambda: FakeEngine(context_size=16))
    response = await worker.client.post("/v1/chat/completions", json=chat_body("word " * 50))
    assert response.status_code == 400
    body = response.json()
    assert_openai_error(body, "context_length_exceeded")
    assert "context length is 16 tokens" in body["error"]["message"]
    # The slot came back: a short prompt is still served.
    assert (
        await worker.client.post("/v1/chat/completions", json=chat_body("hi"))
    ).status_code == 200


async def test_engine_failure_is_a_500_openai_error_not_a_dead_worker(make_worker: Any) -> None:
    worker = await make_worker(lambda: FakeEngine(fail_with=RuntimeError("kaboom")))
    response = await worker.client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 500
    assert_openai_error(response.json(), "generation_failed")
    assert (await worker.client.get("/health")).status_code == 200


async def test_an_engine_not_answering_is_a_503_saying_so(make_worker: Any) -> None:
    worker = await make_worker(lambda: FakeEngine(unreachable=True))
    response = await worker.client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 503
    assert_openai_error(response.json(), "engine_unavailable")
    assert "server is not answering" in response.json()["error"]["message"]
    assert (await worker.client.get("/health")).status_code == 200


async def test_with_a_token_inference_needs_it_and_heartbeats_carry_it(make_worker: Any) -> None:
    worker = await make_worker(token="s3cret")
    assert (await worker.client.get("/health")).status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
        response = await worker.client.request(method, path, json=chat_body())
        assert response.status_code == 401
        assert_openai_error(response.json(), "invalid_token")
    good = await worker.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer s3cret"}
    )
    assert good.status_code == 200
    assert worker.auth
    assert set(worker.auth) == {"Bearer s3cret"}
