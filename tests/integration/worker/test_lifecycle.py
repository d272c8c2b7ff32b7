"""Slots, heartbeats through the lifecycle, disconnects and shutdown — in-process, fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from rbee.contracts.workers import WorkerStatus
from rbee.worker.engines.base import EngineError
from rbee.worker.responses import EventStream
from rbee.worker.runtime import SIGNAL_SETTLE_S
from rbee_testing.fake_engine import FakeEngine

MODEL = "fake-model"  # the conftest's worker serves it under this name
READY, BUSY = WorkerStatus.READY, WorkerStatus.BUSY


def chat_body(content: str = "What is the capital of France?", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def slow(delay: float = 0.02, repeat: bool = True) -> Any:
    return lambda: FakeEngine(token_delay_s=delay, repeat=repeat)


async def eventually(condition: Any, within_s: float = 2.0) -> None:
    async with asyncio.timeout(within_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def test_heartbeats_follow_starting_ready_busy_ready(make_worker: Any) -> None:
    worker = await make_worker(slow(), slots=1)
    await eventually(lambda: worker.statuses[-1:] == [READY])
    # `starting` while the model loads; this engine loads before the first beat goes out.
    assert worker.statuses in ([WorkerStatus.STARTING, READY], [READY])
    request = asyncio.create_task(
        worker.client.post("/v1/chat/completions", json=chat_body(max_tokens=10))
    )
    await eventually(lambda: worker.statuses[-1] is BUSY)
    busy = worker.beats[-1].worker
    assert (busy.in_flight, busy.slots, busy.id, busy.model_id) == (1, 1, "w-test", MODEL)
    assert (await request).status_code == 200
    await eventually(lambda: worker.statuses[-1] is READY)
    assert worker.beats[-1].worker.in_flight == 0


async def test_past_slots_and_queue_the_answer_is_429_with_retry_after(make_worker: Any) -> None:
    worker = await make_worker(slow(0.05), slots=1, queue_size=1)
    body = chat_body(max_tokens=6)
    running = asyncio.create_task(worker.client.post("/v1/chat/completions", json=body))
    await eventually(lambda: worker.runtime.board.in_flight == 1)
    waiting = asyncio.create_task(worker.client.post("/v1/chat/completions", json=body))
    await eventually(lambda: worker.runtime.pool.waiting == 1)
    refused = await worker.client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert [(await t).status_code for t in (running, waiting)] == [200, 200]


async def test_two_slots_generate_two_answers_at_once_on_separate_engines(
    make_worker: Any,
) -> None:
    worker = await make_worker(slow(0.05), slots=2, queue_size=0)
    body = chat_body(max_tokens=6)
    first = asyncio.create_task(worker.client.post("/v1/chat/completions", json=body))
    second = asyncio.create_task(worker.client.post("/v1/chat/completions", json=body))
    await eventually(lambda: worker.statuses[-1] is BUSY)
    assert [(await first).status_code, (await second).status_code] == [200, 200]
    assert len(worker.engines) == 2
    assert [e.generations for e in worker.engines] == [1, 1]
    assert all(e.max_running == 1 for e in worker.engines)


async def test_client_leaving_mid_stream_frees_the_slot_within_a_token(
    make_worker: Any, serve_live: Any
) -> None:
    worker = await make_worker(slow(0.02), slots=1, queue_size=0)
    url = await serve_live(worker.app)
    engine = worker.engines[0]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True, max_tokens=100_000)
        ) as response:
            lines = response.aiter_lines()
            data = [line async for line in _first_data_lines(lines, 3)]
            assert len(data) == 3
        # The stream is closed; the generation must notice at its next token.
        await eventually(lambda: engine.cancelled == 1 and worker.runtime.pool.idle, within_s=1.0)
        emitted = engine.tokens_emitted
        assert emitted < 50
        next_one = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert next_one.status_code == 200


async def test_client_leaving_a_whole_answer_frees_the_slot(
    make_worker: Any, serve_live: Any
) -> None:
    worker = await make_worker(slow(0.02), slots=1, queue_size=0)
    url = await serve_live(worker.app)
    engine = worker.engines[0]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        waiting = asyncio.create_task(
            client.post("/v1/chat/completions", json=chat_body(max_tokens=100_000))
        )
        await eventually(lambda: engine.tokens_emitted > 3)
        waiting.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: engine.cancelled == 1 and worker.runtime.pool.idle, within_s=2.0)
        assert engine.tokens_emitted < 200
        next_one = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert next_one.status_code == 200


async def _first_data_lines(lines: Any, n: int) -> Any:
    count = 0
    async for line in lines:
        if line.startswith("data: "):
            yield line
            count += 1
            if count == n:
                return


async def test_the_official_openai_client_works_unchanged(
    make_worker: Any, serve_live: Any
) -> None:
    worker = await make_worker()
    url = await serve_live(worker.app)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    async with client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        answer = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
        )
        assert answer.choices[0].message.content == "Paris is the capital of France."
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 6
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Capital?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        assert "".join(pieces) == "Paris is the capital of France."
        assert usage is not None
        assert usage.completion_tokens == 6
        text = await client.completions.create(model=MODEL, prompt="The", max_tokens=2)
        assert text.choices[0].text == "Paris is"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=MODEL, messages=[])


async def test_shutdown_refuses_new_work_lets_running_finish_and_says_stopped(
    make_worker: Any,
) -> None:
    worker = await make_worker(slow(0.02), shutdown_grace=3)
    running = asyncio.create_task(
        worker.client.post("/v1/chat/completions", json=chat_body(max_tokens=20))
    )
    await eventually(lambda: worker.runtime.board.in_flight == 1)
    worker.runtime.begin_shutdown()  # what the SIGTERM handler calls
    await eventually(lambda: worker.statuses[-1] is WorkerStatus.STOPPING)
    refused = await worker.client.post("/v1/chat/completions", json=chat_body())
    assert refused.status_code == 503
    assert (await worker.client.get("/health")).json() == {"status": "stopping"}
    await worker.stop()
    finished = await running
    assert finished.status_code == 200
    assert finished.json()["usage"]["completion_tokens"] == 20
    assert worker.statuses[-2:] == [WorkerStatus.STOPPING, WorkerStatus.STOPPED]
    assert worker.engines[0].closed


async def test_past_the_grace_running_work_is_cut_and_the_client_told(make_worker: Any) -> None:
    worker = await make_worker(slow(0.02), shutdown_grace=0.2)
    running = asyncio.create_task(
        worker.client.post("/v1/chat/completions", json=chat_body(max_tokens=100_000))
    )
    await eventually(lambda: worker.runtime.board.in_flight == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    worker.runtime.begin_shutdown()
    await worker.stop()
    assert loop.time() - started < 2.0
    cut = await running
    assert cut.status_code == 503
    assert "shut" in cut.json()["error"]["message"]
    assert worker.statuses[-1] is WorkerStatus.STOPPED


async def test_a_stream_running_past_the_grace_ends_with_an_error_event(
    make_worker: Any, serve_live: Any
) -> None:
    worker = await make_worker(slow(0.02), shutdown_grace=0.3)
    url = await serve_live(worker.app)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = chat_body(stream=True, max_tokens=100_000)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            assert len([line async for line in _first_data_lines(lines, 3)]) == 3
            loop = asyncio.get_running_loop()
            started = loop.time()
            worker.runtime.begin_shutdown()  # what SIGTERM calls; the server keeps serving
            rest = [line.removeprefix("data: ") async for line in lines if line]
    # Cut at the grace period, not at whatever the server's own shutdown timeout is.
    assert 0.25 < loop.time() - started < 1.5
    assert "shut down before the answer was complete" in rest[-1]
    assert "[DONE]" not in rest


async def test_a_silent_stream_sends_keep_alive_comments(serve_live: Any) -> None:
    async def slow_events() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        await asyncio.sleep(0.35)  # a long prompt, a slow model
        yield b"data: second\n\n"

    app = FastAPI()
    app.add_api_route("/events", lambda: EventStream(slow_events(), ping_after_s=0.1))
    url = await serve_live(app)
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        response = await client.get("/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith("data: first\n\n: ping\n\n: ping\n\n")
    assert response.text.endswith("data: second\n\n")


async def test_a_model_that_fails_to_load_stops_the_process_with_its_reason(
    make_worker: Any,
) -> None:
    def broken() -> FakeEngine:
        raise EngineError("model file /m/bad.gguf cannot be loaded: corrupt")

    worker = await make_worker(broken, wait_ready=False)
    await eventually(lambda: worker.stops == [1])
    assert worker.runtime.load_error == "model file /m/bad.gguf cannot be loaded: corrupt"
    assert (await worker.client.get("/health")).status_code == 503
    await worker.stop()
    assert worker.statuses[-1] is WorkerStatus.STOPPED


class DyingHost:
    """An engine host whose process dies once `die` is called."""

    def __init__(self) -> None:
        self.closed = False
        self._died: asyncio.Future[str] | None = None

    async def start(self) -> None:
        self._died = asyncio.get_running_loop().create_future()

    def die(self, reason: str) -> None:
        assert self._died is not None
        self._died.set_result(reason)

    async def failure(self) -> str:
        assert self._died is not None
        return await self._died

    async def close(self) -> None:
        self.closed = True


async def test_an_engine_host_that_dies_stops_the_worker_with_its_reason(
    make_worker: Any,
) -> None:
    host = DyingHost()
    worker = await make_worker(engine_host=host)
    host.die("llama.cpp's server exited with code -9: killed")
    # Not at once: the worker first gives its own stop signal a moment to arrive.
    await eventually(lambda: worker.stops == [1], within_s=10)
    assert worker.runtime.load_error == "llama.cpp's server exited with code -9: killed"
    health = await worker.client.get("/health")
    assert health.status_code == 503
    assert health.json() == {
        "status": "unhealthy",
        "reason": "llama.cpp's server exited with code -9: killed",
    }
    await worker.stop()
    assert host.closed
    assert worker.statuses[-1] is WorkerStatus.STOPPED


async def test_an_engine_that_exits_with_the_workers_own_stop_signal_is_no_failure(
    make_worker: Any,
) -> None:
    """A signal to the whole process group (Ctrl-C, systemd) reaches llama-server too, and it
    may exit before the worker has stopped."""
    host = DyingHost()
    worker = await make_worker(engine_host=host)
    worker.runtime.begin_shutdown()  # what the worker's SIGTERM handler calls
    host.die("llama.cpp's server exited with code 0: stopped")
    await asyncio.sleep(SIGNAL_SETTLE_S + 0.5)
    assert worker.stops == []
    assert worker.runtime.load_error is None
    await worker.stop()
    assert worker.statuses[-1] is WorkerStatus.STOPPED


async def test_an_idle_worker_frees_its_engine_at_the_stop_signal(make_worker: Any) -> None:
    """Nothing to finish: llama-server goes at once, beside the server's own shutdown, so a
    swap gets its memory back sooner. One with a request in flight keeps it until the end."""
    host = DyingHost()
    worker = await make_worker(engine_host=host)
    worker.runtime.begin_shutdown()  # what the worker's SIGTERM handler calls
    await eventually(lambda: host.closed)
    await worker.stop()
    assert worker.statuses[-1] is WorkerStatus.STOPPED

    busy_host = DyingHost()
    busy = await make_worker(slow(0.02), engine_host=busy_host, shutdown_grace=3)
    running = asyncio.create_task(
        busy.client.post("/v1/chat/completions", json=chat_body(max_tokens=20))
    )
    await eventually(lambda: busy.runtime.board.in_flight == 1)
    busy.runtime.begin_shutdown()
    await asyncio.sleep(0.1)
    assert not busy_host.closed, "its engine serves the request in flight"
    await busy.stop()
    assert (await running).status_code == 200
    assert busy_host.closed


class HeldHost:
    """An engine host whose start (the model's load) waits until `release`, then fails with
    `error` if one is given."""

    def __init__(self, error: str | None = None) -> None:
        self.release = asyncio.Event()
        self.error = error

    async def start(self) -> None:
        await self.release.wait()
        if self.error is not None:
            raise EngineError(self.error)

    async def failure(self) -> str:
        await asyncio.Event().wait()  # never dies
        return ""

    async def close(self) -> None:
        pass


async def test_health_with_wait_answers_the_moment_the_model_is_loaded(make_worker: Any) -> None:
    host = HeldHost()
    worker = await make_worker(engine_host=host, wait_ready=False)
    # Still loading when the wait runs out: the usual answer, after the wait.
    began = asyncio.get_running_loop().time()
    loading = await worker.client.get("/health", params={"wait": 0.2})
    assert loading.status_code == 503
    assert loading.json() == {"status": "loading"}
    assert asyncio.get_running_loop().time() - began >= 0.15
    # Asked once, answered as soon as the load ends.
    waiting = asyncio.create_task(worker.client.get("/health", params={"wait": 5}))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    host.release.set()
    async with asyncio.timeout(1.0):
        answer = await waiting
    assert answer.status_code == 200
    assert answer.json()["state"] == "ready"
    # Bounded: nobody holds a connection open for longer than that.
    assert (await worker.client.get("/health", params={"wait": 11})).status_code == 400
    assert (await worker.client.get("/health", params={"wait": -1})).status_code == 400


async def test_health_with_wait_answers_a_failed_load_at_once(make_worker: Any) -> None:
    host = HeldHost(error="model file /m/bad.gguf cannot be loaded: corrupt")
    worker = await make_worker(engine_host=host, wait_ready=False)
    waiting = asyncio.create_task(worker.client.get("/health", params={"wait": 5}))
    await asyncio.sleep(0.05)
    host.release.set()
    async with asyncio.timeout(1.0):
        answer = await waiting
    assert answer.status_code == 503
    assert answer.json()["status"] == "unhealthy"
    assert "corrupt" in answer.json()["reason"]
