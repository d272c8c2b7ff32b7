"""Prefix routing through the real queen app (issue 26): fake workers on loopback ports answer
with OpenAI usage, the queen routes by the conversation and counts what it decided and what the
workers' caches served."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from rbee.queen.app import create_app
from rbee.queen.settings import QueenSettings
from rbee_testing.metrics import Samples, parse_samples, value
from rbee_testing.worker_servers import WorkerServers, worker_beat

SYSTEM = "You review pull requests for the ACME build system. " * 30


def usage(body: dict[str, Any]) -> dict[str, Any]:
    """What a llama.cpp worker would say: every message but the last came from its cache."""
    prompt = sum(len(str(m["content"])) for m in body["messages"]) // 4
    cached = prompt - len(str(body["messages"][-1]["content"])) // 4
    return {
        "prompt_tokens": prompt,
        "completion_tokens": 1,
        "total_tokens": prompt + 1,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def stream(body: dict[str, Any]) -> AsyncIterator[bytes]:
    yield b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
    if (body.get("stream_options") or {}).get("include_usage"):
        yield f'data: {{"choices":[],"usage":{json.dumps(usage(body))}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


async def worker(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        return httpx.Response(
            200, content=stream(body), headers={"content-type": "text/event-stream"}
        )
    answer = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": usage(body),
    }
    return httpx.Response(200, json=answer)


class Queen:
    def __init__(self, **settings: Any) -> None:
        self.app = create_app(QueenSettings.model_validate({"cooldown": 30, **settings}))
        self.servers = WorkerServers(lambda name: worker)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1:7999"
        )

    async def heartbeat(self, worker_id: str, slots: int = 2) -> None:
        port = await self.servers.port(worker_id)
        body = worker_beat(worker_id, port, slots=slots)
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()

    async def chat(self, messages: list[dict[str, str]], **extra: Any) -> httpx.Response:
        headers = extra.pop("headers", {})
        body = {"model": "m", "messages": messages, **extra}
        response = await self.client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return response

    async def scrape(self) -> Samples:
        return parse_samples((await self.client.get("/metrics")).text)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.app.state.queen.aclose()
        await self.servers.aclose()


@pytest.fixture
async def queen() -> AsyncIterator[Queen]:
    q = Queen()  # the default policy: prefix
    for w in ("w1", "w2", "w3"):
        await q.heartbeat(w)
    yield q
    await q.aclose()


def conversation(n: int, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": f"Repository {n}. {SYSTEM}"}]
    for t in range(turns):
        if t:
            messages.append({"role": "assistant", "content": f"answer {t} " * 20})
        messages.append({"role": "user", "content": f"question {t} about file {n}.py " * 10})
    return messages


async def test_each_conversations_turns_land_on_one_worker(queen: Queen) -> None:
    homes: dict[int, set[str]] = {n: set() for n in range(3)}
    for turns in range(1, 4):
        for n in range(3):
            response = await queen.chat(conversation(n, turns))
            homes[n].add(response.headers["x-rbee-worker-id"])
    assert all(len(h) == 1 for h in homes.values()), homes
    assert set().union(*homes.values()) == {"w1", "w2", "w3"}  # new ones went least-loaded
    samples = await queen.scrape()
    decisions = "rbee_route_decisions_total"
    assert value(samples, decisions, policy="prefix", outcome="prefix_hit") == 6
    assert value(samples, decisions, policy="prefix", outcome="least_loaded") == 3
    # What the workers said they took from their caches, per model.
    prompt = value(samples, "rbee_prompt_tokens_total", model="m")
    cached = value(samples, "rbee_prompt_tokens_cached_total", model="m")
    assert 0 < cached < prompt


async def test_a_streamed_usage_chunk_is_counted_and_passed_on(queen: Queen) -> None:
    plain = await queen.chat(conversation(0, 2), stream=True)
    assert '"usage"' not in plain.text
    samples = await queen.scrape()
    assert value(samples, "rbee_prompt_tokens_total", model="m") == 0
    asked = await queen.chat(
        conversation(0, 2), stream=True, stream_options={"include_usage": True}
    )
    assert '"cached_tokens"' in asked.text
    expected = usage({"messages": conversation(0, 2)})
    samples = await queen.scrape()
    assert value(samples, "rbee_prompt_tokens_total", model="m") == expected["prompt_tokens"]
    assert (
        value(samples, "rbee_prompt_tokens_cached_total", model="m")
        == expected["prompt_tokens_details"]["cached_tokens"]
    )


async def test_a_session_sticks_to_its_worker(queen: Queen) -> None:
    by_header = {
        (await queen.chat(conversation(n, 1), headers={"x-session-id": "s-1"})).headers[
            "x-rbee-worker-id"
        ]
        for n in range(4)
    }
    by_user = {
        (await queen.chat(conversation(n + 10, 1), user="bob")).headers["x-rbee-worker-id"]
        for n in range(4)
    }
    assert len(by_header) == 1
    assert len(by_user) == 1
    samples = await queen.scrape()
    assert value(samples, "rbee_route_decisions_total", policy="prefix", outcome="session") == 6


async def test_least_loaded_ignores_prefixes() -> None:
    q = Queen(routing_policy="least-loaded")
    try:
        for w in ("w1", "w2", "w3"):
            await q.heartbeat(w)
        served = {(await q.chat(conversation(0, 1))).headers["x-rbee-worker-id"] for _ in range(3)}
        assert served == {"w1", "w2", "w3"}
        samples = await q.scrape()
        assert value(samples, "rbee_route_decisions_total", policy="least-loaded") == 3
    finally:
        await q.aclose()
