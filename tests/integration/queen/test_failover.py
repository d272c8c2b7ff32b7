"""Failover in the queen's request path, in-process. Each worker is a small HTTP server on a
loopback port (`rbee_testing.worker_servers`); a dead worker is a port nothing listens on; the
hive is played by an injected transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.requests import ClientDisconnect

from rbee.common.net import dead_peer_options
from rbee.queen.app import create_app
from rbee.queen.proxy import connection_refused
from rbee.queen.settings import QueenSettings
from rbee.queen.upstream import UpstreamClient, UpstreamError
from rbee_testing.processes import free_port
from rbee_testing.worker_servers import Handler, WorkerServers, hive_beat, worker_beat

# A worker factory: a name gives a handler, or None for a worker that dies at once.
NewWorker = Callable[[str], Handler | None]


def answer(worker: str) -> httpx.Response:
    message = {"role": "assistant", "content": f"from {worker}"}
    return httpx.Response(
        200, json={"object": "chat.completion", "choices": [{"message": message}]}
    )


def full() -> httpx.Response:
    error = {"message": "all slots busy", "type": "rate_limit_error", "code": "queue_full"}
    return httpx.Response(429, json={"error": error}, headers={"retry-after": "3"})


def ok(name: str) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        return answer(name)

    return handler


class Cluster:
    """The queen under test is real; each worker is a handler, the hive starts new ones."""

    def __init__(
        self,
        *,
        new_workers: NewWorker = ok,
        new_id: Callable[[int], str] = lambda n: f"new-{n}",
        new_status: str = "ready",
    ) -> None:
        self.workers: dict[str, Handler] = {}
        self.servers = WorkerServers(self.workers.get)
        self.spawns = 0
        self.new_workers = new_workers
        self.new_id = new_id
        self.new_status = new_status  # what a new worker's first heartbeat says
        self.app = create_app(
            QueenSettings.model_validate({"queue_size": 4, "queue_timeout": 2, "cooldown": 30}),
            transport=httpx.MockTransport(self.handle),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1:9", timeout=10
        )

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.app.state.queen.aclose()
        await self.servers.aclose()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == "hive.test", "only hive traffic goes through the transport"
        return await self.spawn(json.loads(request.content)["model"])

    async def spawn(self, model: str) -> httpx.Response:
        self.spawns += 1
        worker_id = self.new_id(self.spawns)
        handler = self.new_workers(worker_id)
        if handler is None:
            port = await self.heartbeat_dead(worker_id, model)
        else:
            self.workers[worker_id] = handler
            port = await self.heartbeat(worker_id, model, self.new_status)
        url = f"http://127.0.0.1:{port}"
        body = {"worker_id": worker_id, "pid": 1, "port": port, "url": url}
        return httpx.Response(201, json=body)

    async def heartbeat(self, worker_id: str, model: str = "m", status: str = "ready") -> int:
        return await self._beat(worker_id, await self.servers.port(worker_id), model, status)

    async def heartbeat_dead(self, worker_id: str, model: str = "m") -> int:
        """A worker still fresh in the registry whose process is gone: its port is closed."""
        return await self._beat(worker_id, free_port(), model, "ready")

    async def _beat(self, worker_id: str, port: int, model: str, status: str) -> int:
        body = worker_beat(worker_id, port, model, status, hive_id="h1")
        (await self.client.post("/v1/worker-heartbeat", json=body)).raise_for_status()
        return port

    async def hive_has(self, *models: str) -> None:
        (await self.client.post("/v1/hive-heartbeat", json=hive_beat(models))).raise_for_status()

    async def chat(self, model: str = "m", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post("/v1/chat/completions", json=body)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    yield c
    await c.aclose()


async def test_a_full_worker_hands_the_request_to_one_with_room(cluster: Cluster) -> None:
    cluster.workers["a-full"] = lambda request: asyncio.sleep(0, full())
    cluster.workers["b-free"] = ok("b-free")
    await cluster.heartbeat("a-full")
    await cluster.heartbeat("b-free")
    served = [(await cluster.chat()).headers["x-rbee-worker-id"] for _ in range(4)]
    assert served == ["b-free"] * 4, "a 429 is never what the client sees while one has room"


async def test_when_every_worker_is_full_their_429_reaches_the_client(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.workers[name] = lambda request: asyncio.sleep(0, full())
        await cluster.heartbeat(name)
    response = await cluster.chat()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "queue_full"
    cluster.workers["a"] = ok("a")
    assert (await cluster.chat()).status_code == 200, "full is not broken: nobody was benched"


async def test_a_stream_that_fails_before_its_first_byte_is_retried(cluster: Cluster) -> None:
    async def dies_at_once() -> AsyncIterator[bytes]:
        raise httpx.ReadError("connection reset by peer")
        yield b""  # pragma: no cover - makes this a generator

    async def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=dies_at_once(), headers={"content-type": "text/event-stream"}
        )

    async def streams(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )

    cluster.workers["a-broken"] = broken
    cluster.workers["b-good"] = streams
    await cluster.heartbeat("a-broken")
    await cluster.heartbeat("b-good")
    response = await cluster.chat(stream=True)
    assert response.status_code == 200
    assert response.headers["x-rbee-worker-id"] == "b-good"
    assert response.text == "data: [DONE]\n\n"


async def test_a_worker_leaving_the_registry_sends_its_waiting_requests_elsewhere(
    cluster: Cluster,
) -> None:
    reached = asyncio.Event()

    async def hangs(request: httpx.Request) -> httpx.Response:
        reached.set()
        await asyncio.sleep(3600)  # a machine that vanished: no answer, ever
        raise AssertionError("unreachable")

    cluster.workers["a-vanished"] = hangs
    cluster.workers["b-alive"] = ok("b-alive")
    await cluster.heartbeat("a-vanished")
    pending = asyncio.create_task(cluster.chat())
    await asyncio.wait_for(reached.wait(), 5)
    await cluster.heartbeat("b-alive")
    assert (await cluster.client.delete("/v1/workers/a-vanished")).status_code == 200
    response = await asyncio.wait_for(pending, 5)
    assert response.status_code == 200
    assert response.headers["x-rbee-worker-id"] == "b-alive"


async def test_the_dead_only_worker_of_a_model_is_replaced(cluster: Cluster) -> None:
    await cluster.hive_has("m")
    await cluster.heartbeat_dead("killed")
    responses = await asyncio.gather(*(cluster.chat() for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.headers["x-rbee-worker-id"] for r in responses} == {"new-1"}
    assert cluster.spawns == 1, "one start serves every waiting request"


async def test_a_replacement_that_reuses_the_dead_workers_id_serves_everyone() -> None:
    """A hive names workers by hive and port, so a new worker may take a dead one's id."""
    cluster = Cluster(new_id=lambda n: "w-8080")
    try:
        await cluster.hive_has("m")
        await cluster.heartbeat_dead("w-8080")
        responses = await asyncio.wait_for(asyncio.gather(*(cluster.chat() for _ in range(4))), 10)
        assert [r.status_code for r in responses] == [200] * 4
        assert cluster.spawns == 1
    finally:
        await cluster.aclose()


async def test_a_replacement_taken_by_other_requests_at_once_serves_those_that_started_it() -> None:
    """Requests that arrive while a replacement starts take it as soon as it is up, so the
    first heartbeat the queen sees may say `busy`, and under steady load it may never say
    `ready`: the requests that started it must not wait for a `ready` that never comes."""
    cluster = Cluster(new_status="busy")
    try:
        await cluster.hive_has("m")
        await cluster.heartbeat_dead("killed")
        responses = await asyncio.wait_for(asyncio.gather(*(cluster.chat() for _ in range(3))), 10)
        assert [r.status_code for r in responses] == [200] * 3
        assert {r.headers["x-rbee-worker-id"] for r in responses} == {"new-1"}
        assert cluster.spawns == 1
    finally:
        await cluster.aclose()


async def test_a_start_that_fails_once_on_the_only_hive_is_tried_again(cluster: Cluster) -> None:
    """A replacement killed while loading is a first failure: the waiting requests get the
    next start on the same hive instead of an error."""
    spawn = cluster.spawn

    async def first_start_fails(model: str) -> httpx.Response:
        if cluster.spawns == 0:
            cluster.spawns += 1
            error = {"message": "worker exited during start-up", "type": "server_error"}
            return httpx.Response(503, json={"error": error})
        return await spawn(model)

    cluster.spawn = first_start_fails  # type: ignore[method-assign]
    await cluster.hive_has("m")
    responses = await asyncio.gather(*(cluster.chat() for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.headers["x-rbee-worker-id"] for r in responses} == {"new-2"}
    assert cluster.spawns == 2


async def test_a_model_that_keeps_dying_is_held_back_with_its_reason() -> None:
    cluster = Cluster(new_workers=lambda name: None)  # every new worker dies at once
    try:
        await cluster.hive_has("m")
        for _ in range(2):
            failed = await cluster.chat()
            assert failed.status_code in (502, 503)
        assert cluster.spawns == 2
        held = await cluster.chat()
        assert held.status_code == 503
        assert held.json()["error"]["code"] == "no_worker"
        assert "on hold" in held.json()["error"]["message"]
        assert int(held.headers["retry-after"]) >= 1
        assert cluster.spawns == 2, "no start while the model is on hold"
        models = (await cluster.client.get("/v1/models")).json()["data"]
        (backoff,) = models[0]["rbee"]["backoff"]
        assert backoff["hive_id"] == "h1"
        assert backoff["failures"] == 2
        assert "died" in backoff["reason"]
        assert 0 < backoff["retry_in_s"] <= 5
    finally:
        await cluster.aclose()


async def ignore(message: Any) -> None:
    pass


def asgi_chat(
    app: Any,
    messages: asyncio.Queue[dict[str, Any]],
    send: Callable[[Any], Awaitable[None]] = ignore,
    **extra: Any,
) -> Any:
    """One chat request driven as uvicorn would: the body, then whatever `messages` brings."""
    body = json.dumps({"model": "m", "messages": [], **extra}).encode()
    messages.put_nowait({"type": "http.request", "body": body, "more_body": False})

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
        "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1:9")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
    }  # fmt: skip
    return app(scope, messages.get, send)


async def test_a_client_that_leaves_frees_its_slot_under_a_real_asgi_server(
    cluster: Cluster,
) -> None:
    """uvicorn never cancels a handler; the queen must notice `http.disconnect` itself."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    cluster.workers["w"] = slow
    await cluster.heartbeat("w")
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    handler = asyncio.create_task(asgi_chat(cluster.app, messages))
    await asyncio.wait_for(started.wait(), 5)
    messages.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(handler, 5)
    assert cancelled.is_set(), "the worker's request was cancelled"
    cluster.workers["w"] = ok("w")
    assert (await asyncio.wait_for(cluster.chat(), 5)).status_code == 200, "the slot is free"


async def test_a_client_gone_as_the_first_bytes_arrive_frees_the_slot(cluster: Cluster) -> None:
    """The client leaves just as the worker's answer begins: the server fails to send the
    response's start (uvicorn raises an OSError there), so the answer's body is never read.
    The worker's slot must still be freed, or a one-slot worker is skipped for good."""

    async def stream(request: httpx.Request) -> httpx.Response:
        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"choices": []}\n\n'
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    async def gone(message: Any) -> None:
        raise ConnectionResetError("the client closed the connection")

    cluster.workers["w"] = stream  # one slot
    await cluster.heartbeat("w")
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    with pytest.raises(ClientDisconnect):
        await asyncio.wait_for(asgi_chat(cluster.app, messages, gone, stream=True), 5)
    tracker = cluster.app.state.queen.router.tracker
    assert tracker.in_flight("w") == 0, "the slot is free"
    cluster.workers["w"] = ok("w")
    assert (await asyncio.wait_for(cluster.chat(), 5)).status_code == 200


async def test_a_removed_worker_leaves_no_count_to_the_next_with_its_id(cluster: Cluster) -> None:
    """Worker ids (hive and port) are given again: a request begun on a worker that has been
    removed since must not count against, or be taken off, the next worker with its id."""
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return answer("w")

    cluster.workers["w"] = slow  # one slot
    await cluster.heartbeat("w")
    serving = asyncio.create_task(cluster.chat())
    tracker = cluster.app.state.queen.router.tracker
    for _ in range(500):
        if tracker.in_flight("w"):
            break
        await asyncio.sleep(0.01)
    assert tracker.in_flight("w") == 1
    assert (await cluster.client.delete("/v1/workers/w")).status_code < 300
    assert tracker.in_flight("w") == 0, "the removed worker's count is gone"
    cluster.workers["w"] = ok("w")
    await cluster.heartbeat("w")  # a new worker with the same id
    assert (await asyncio.wait_for(cluster.chat(), 5)).status_code == 200
    release.set()
    await serving
    assert tracker.in_flight("w") == 0, "the old request's end left the new worker's count alone"


async def test_a_client_that_leaves_the_queue_frees_its_place(cluster: Cluster) -> None:
    release = asyncio.Event()

    async def busy(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return answer("w")

    cluster.workers["w"] = busy  # one slot
    await cluster.heartbeat("w")
    serving = asyncio.create_task(cluster.chat())
    admission = cluster.app.state.queen.router.admission
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    waiting = asyncio.create_task(asgi_chat(cluster.app, messages))
    for _ in range(100):
        if admission.waiting(("m", False)):
            break
        await asyncio.sleep(0.01)
    assert admission.waiting(("m", False)) == 1
    messages.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(waiting, 5)
    assert admission.waiting(("m", False)) == 0, "its place in line is free"
    release.set()
    assert (await serving).status_code == 200
    assert cluster.servers.served.count("w") == 1, "the request that left never reached a worker"


async def test_a_closed_port_reads_as_a_dead_process_and_a_timeout_does_not() -> None:
    """What counts against a model's starts: a refused connection, not a slow network."""
    client = UpstreamClient(dead_peer_options())
    try:
        with pytest.raises(UpstreamError) as refused:
            await client.post(f"http://127.0.0.1:{free_port()}/", b"{}", {})
    finally:
        await client.aclose()
    assert connection_refused(refused.value)
    assert not connection_refused(UpstreamError("timed out"))
    assert not connection_refused(ConnectionResetError("connection reset by peer"))
