"""The OpenAI front door: find a worker for the request's model and stream its answer back.

The proxy is a relay; what to do after each try is decided by `routing.retry`, which worker
by the router, whether to start one by the spawner. Nothing reaches the client until a
worker's first bytes are in (all of them, for a whole answer), so until then a request can
still go elsewhere: a worker that fails, vanishes (found dead by TCP, or declared offline by
the registry) or answers 5xx is benched and the request retried; a worker whose own queue is
full (429) hands the request to one with room. After the first byte the client gets an error
event and the stream ends. A client that leaves frees its place in line and its worker slot.

One exception: a streaming request that must wait for its model to load (a cold start) gets
its SSE headers (200) and a comment line (`: loading MODEL`) every few seconds while it waits,
so that clients and proxies between do not time out; then the worker's stream follows, or, if
the start fails, an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from rbee.common.disconnect import CLIENT_CLOSED_REQUEST, ClientGone, unless_client_leaves
from rbee.common.errors import (
    BadGateway,
    BadRequest,
    NotFound,
    RbeeError,
    TooManyRequests,
    Unavailable,
    quote,
)
from rbee.common.gate import API_KEY_SCOPE
from rbee.common.tokens import auth_headers
from rbee.contracts.workers import parse_keep_alive
from rbee.queen.hives import HiveRegistry
from rbee.queen.loading import loading_stream
from rbee.queen.metrics import CLIENT_CLOSED, QueenMetrics, RequestTrack
from rbee.queen.registry import WorkerRegistry
from rbee.queen.relay import Attempt, Relay, RelayResponse
from rbee.queen.routing.admission import NothingToWaitFor, QueueFull, WaitExpired
from rbee.queen.routing.prefixes import SESSION_HEADER, RouteKey
from rbee.queen.routing.retry import Outcome, Step, classify, next_step
from rbee.queen.routing.router import Lease, Router
from rbee.queen.scheduler.placement import hives_with_model
from rbee.queen.scheduler.spawner import Spawner
from rbee.queen.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from rbee.queen.usage import (
    metered_stream,
    prompt_usage,
    request_usage,
    total_tokens,
    watched_stream,
)

log = logging.getLogger("rbee.queen.proxy")
WORKER_HEADER = "x-rbee-worker-id"
LOADING_COMMENT_S = 3.0  # how often a request waiting for its model to load hears so
CUT_MEMORY_S = 300.0  # how long a worker stopped by `rbee unload --now` is remembered as such
PASSED_REQUEST_HEADERS = ("content-type", "accept", "x-request-id")


def parse_body(raw: bytes) -> tuple[str, bool, float | None]:
    """The fields the queen needs: `model`, `stream`, and `keep_alive` (seconds, math.inf to
    keep the model loaded; None when not given). Everything passes through to the worker, which
    keeps fields it does not know (llama.cpp ignores them)."""
    return parse_request(raw)[1:]


def parse_request(raw: bytes) -> tuple[dict[str, Any], str, bool, float | None]:
    """The body as parsed (what the router reads a prefix from), and `parse_body`'s fields."""
    try:
        payload: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required and must be a non-empty string", code="missing_model")
    keep_alive = payload.get("keep_alive")
    if keep_alive is not None:
        try:
            keep_alive = parse_keep_alive(keep_alive)
        except ValueError as exc:
            raise BadRequest(
                f"keep_alive: {exc}", code="invalid_keep_alive", param="keep_alive"
            ) from None
    return payload, model, payload.get("stream") is True, keep_alive


def connection_refused(exc: BaseException) -> bool:
    """The worker's machine answered but nothing listens on the port: the process is gone."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _wrong_kind(model: str, embedding: bool) -> BadRequest:
    if embedding:
        return BadRequest(
            f"model {quote(model)} is served for chat and completions only; embeddings need a "
            "worker started for them (rbee worker spawn --embedding)",
            code="model_not_embedding",
            param="model",
        )
    return BadRequest(
        f"model {quote(model)} is served for embeddings only (POST /v1/embeddings)",
        code="model_not_chat",
        param="model",
    )


class Proxy:
    def __init__(
        self,
        registry: WorkerRegistry,
        hives: HiveRegistry,
        router: Router,
        spawner: Spawner,
        client: UpstreamClient,
        *,
        token: str | None,
        retries: int,
        metrics: QueenMetrics,
        usage: Callable[[str, int], None] = lambda key, tokens: None,
    ) -> None:
        self.registry = registry
        self.hives = hives
        self.router = router
        self.spawner = spawner
        self.client = client
        self.token = token
        self.retries = retries
        self.metrics = metrics
        self.usage = usage  # tokens served to an API key
        self.loading_comment_s = LOADING_COMMENT_S
        # Workers stopped by `rbee unload --now`, and when: their requests are not retried.
        self._cut: dict[str, float] = {}

    def cut(self, worker_id: str) -> None:
        """The worker is being stopped by hand (`rbee unload --now`): a request it fails gets
        503 `worker_stopping`, not another worker (the model is going away on purpose)."""
        now = time.monotonic()
        self._cut = {w: t for w, t in self._cut.items() if now - t < CUT_MEMORY_S}
        self._cut[worker_id] = now

    def cold(self, model: str, embedding: bool) -> bool:
        """No worker of the model serves yet: a request for it waits for a load."""
        if self.spawner.loading.get(model):
            return not self.router.candidates(model, embedding=embedding)
        return not self.router.has_live_worker(model, embedding=embedding)

    def known_models(self) -> list[str]:
        served = set(self.registry.models())
        for hive in self.hives.all():
            if hive.online:
                served.update(hive.models)
        return sorted(served)

    async def lease(
        self,
        model: str,
        failed: Collection[str] = (),
        *,
        embedding: bool = False,
        route: RouteKey | None = None,
        arrived: float | None = None,
    ) -> Lease:
        """A worker slot for the model: now, after waiting in line, or after starting a worker.
        `arrived`: when the request came (the queen's clock; default now), which places it in
        its model's turn when another model waits for the memory (scheduler.room).

        Workers that failed this request are left out by their bench, not by their id: a hive
        may give a new worker the id (hive and port) of one that died, and a request waiting
        in line for a worker it can never take would hold up everyone behind it."""
        if not self.router.has_live_worker(model, embedding=embedding):
            of_model = self.registry.find_workers_by_model(model)
            known_workers = [w for w in of_model if w.embedding is embedding]
            if hives_with_model(self.hives.all(), model):
                # No worker that can serve (none yet, or all dead or benched): start one, as
                # for a cold model. The spawner holds back where starts keep failing.
                await self.spawner.ensure_worker(model, embedding=embedding)
            elif known_workers:
                which = f" ({', '.join(failed)} failed)" if failed else ""
                raise Unavailable(
                    f"no worker for model {quote(model)} is reachable right now{which}",
                    code="no_worker",
                )
            elif of_model:
                raise _wrong_kind(model, embedding)
            elif offline := [h.id for h in self.hives.all() if model in h.models]:
                raise Unavailable(
                    f"no worker for model {quote(model)}, and the hives that have it are offline "
                    f"({', '.join(sorted(offline))})",
                    code="no_worker",
                )
            else:
                known = ", ".join(self.known_models()) or "none"
                raise NotFound(
                    f"model {quote(model)} is not served by any worker and no hive has it "
                    f"(models: {known})",
                    code="model_not_found",
                )
        admission = self.router.admission
        try:
            return await self.router.acquire(model, embedding=embedding, key=route, arrived=arrived)
        except NothingToWaitFor:
            # Its workers went (unloaded, evicted, gone) while it waited: start one.
            return await self.lease(
                model, failed, embedding=embedding, route=route, arrived=arrived
            )
        except QueueFull:
            raise TooManyRequests(
                f"all workers for {quote(model)} are busy and {admission.max_waiting} requests "
                "already wait",
                retry_after_s=2,
                code="queue_full",
            ) from None
        except WaitExpired:
            raise TooManyRequests(
                f"no worker for {quote(model)} freed up within {admission.max_wait_s:.0f}s",
                retry_after_s=2,
                code="queue_timeout",
            ) from None

    async def forward(
        self, request: Request, path: str, *, embedding: bool = False, body: bytes | None = None
    ) -> Response:
        """`embedding`: the request goes to the model's embedding workers (`/v1/embeddings`).
        `body`: what to send instead of the request's own (an API translated to OpenAI's)."""
        raw = await request.body() if body is None else body
        payload, model, stream, keep_alive = parse_request(raw)
        route = self.router.route_key(payload, request.headers.get(SESSION_HEADER))
        track = self.metrics.track(model)
        track.streamed = stream
        try:
            work = self._forward(model, track, path, raw, request, embedding, keep_alive, route)
            if stream and self.cold(model, embedding):
                return await self._while_loading(request, model, track, work)
            return await unless_client_leaves(request.receive, work)
        except ClientGone:
            track.refused(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except RbeeError as exc:
            track.refused(exc.status_code)
            raise
        except BaseException:
            track.refused(CLIENT_CLOSED)
            raise

    async def _while_loading(
        self,
        request: Request,
        model: str,
        track: RequestTrack,
        work: Awaitable[Response],
    ) -> Response:
        """A streaming request for a model being loaded: answered as usual if it is quick
        (errors keep their status), else streamed at once, with comments until the answer."""
        task = asyncio.ensure_future(work)

        async def first_wait() -> None:
            await asyncio.wait({task}, timeout=self.loading_comment_s)

        try:
            await unless_client_leaves(request.receive, first_wait())
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if task.done():
            return task.result()
        return StreamingResponse(
            loading_stream(task, model, track, self.loading_comment_s),
            media_type="text/event-stream",
        )

    async def _forward(
        self,
        model: str,
        track: RequestTrack,
        path: str,
        raw: bytes,
        request: Request,
        embedding: bool,
        keep_alive: float | None = None,
        route: RouteKey | None = None,
    ) -> Response:
        key: str | None = request.scope.get(API_KEY_SCOPE)
        keep_usage = True
        if key is not None and track.streamed:
            raw, keep_usage = request_usage(raw)
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_REQUEST_HEADERS}
        headers.update(auth_headers(self.token))
        tried: list[str] = []
        failures = 0
        whole = not track.streamed
        arrived = self.registry.now()
        lease = await self.lease(model, tried, embedding=embedding, route=route, arrived=arrived)
        while True:
            track.lease(lease.worker_id)
            if keep_alive is not None:  # Ollama's meaning: the worker's keep-alive from now on
                self.router.tracker.ask_keep_alive(lease.worker_id, keep_alive)
            try:
                attempt = await self._attempt(lease, path, raw, headers, whole)
            except BaseException:
                # The client left while we waited for the worker, or something unforeseen: the
                # slot must not stay counted as busy.
                self.router.release(lease)
                raise
            if attempt.outcome in (Outcome.FAILED, Outcome.GONE):
                failures += 1
            step = next_step(attempt.outcome, failures, self.retries)
            tried.append(lease.worker_id)
            if step not in (Step.RELAY, Step.OVERFLOW) and lease.worker_id in self._cut:
                # Unloaded by hand with --now: the client hears so, no other worker starts.
                self.router.release(lease)
                raise Unavailable(
                    f"worker {lease.worker_id} was stopped while answering: model "
                    f"{quote(model)} was unloaded (rbee unload --now)",
                    code="worker_stopping",
                )
            if step is Step.RELAY:
                return self._answer(lease, attempt, track, key, keep_usage, raw)
            if step is Step.OVERFLOW:
                self.router.release(lease)  # busy is not broken: no bench
                other = self.router.try_take(model, tried, embedding=embedding, key=route)
                if other is None:
                    track.end(429)
                    return self._full(lease, attempt)
                lease = other
                continue
            log.warning("worker failed before answering: %s", attempt.reason)
            self.router.fail(lease)
            track.failover()
            if attempt.refused:
                self.spawner.worker_lost(lease.worker_id, "connection refused")
            if step is Step.GIVE_UP:
                raise BadGateway(
                    f"{failures} worker(s) failed for {quote(model)}; last: {attempt.reason}"
                )
            lease = await self.lease(
                model, tried, embedding=embedding, route=route, arrived=arrived
            )

    def _answer(
        self,
        lease: Lease,
        attempt: Attempt,
        track: RequestTrack,
        key: str | None,
        keep_usage: bool,
        raw: bytes = b"",
    ) -> Response:
        response = self._respond(lease, attempt, track)
        # The prompt tokens and how many came from the worker's cache, wherever usage shows.
        if isinstance(response, StreamingResponse):
            if key is not None or b'"include_usage"' in raw:
                response.body_iterator = watched_stream(
                    response.body_iterator,  # type: ignore[arg-type]  # _relay: bytes
                    track.prompt_usage,
                )
        elif attempt.upstream is not None and (
            found := prompt_usage(attempt.upstream.content or b"")
        ):
            track.prompt_usage(*found)
        if key is not None:  # tokens served to an API key are counted
            assert attempt.upstream is not None
            if isinstance(response, StreamingResponse):
                response.body_iterator = metered_stream(
                    response.body_iterator,  # type: ignore[arg-type]  # _relay: bytes
                    keep_usage_chunk=keep_usage,
                    record=lambda tokens: self.usage(key, tokens),
                )
            elif (tokens := total_tokens(attempt.upstream.content or b"")) is not None:
                self.usage(key, tokens)
        return response

    async def _attempt(
        self, lease: Lease, path: str, raw: bytes, headers: dict[str, str], whole: bool
    ) -> Attempt:
        """Send the request and wait for the answer (its first bytes, or all of it if `whole`),
        unless the registry declares the worker gone first."""
        gone = self.router.departure(lease.worker_id)  # shared: never cancelled here
        exchange = asyncio.ensure_future(self._exchange(lease, path, raw, headers, whole))
        either: set[asyncio.Future[Any]] = {exchange, gone}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not exchange.done():
                exchange.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(exchange, return_exceptions=True)
        if exchange.cancelled():
            return Attempt(Outcome.GONE, f"{lease.worker_id}: went offline before answering")
        return exchange.result()

    async def _exchange(
        self, lease: Lease, path: str, raw: bytes, headers: dict[str, str], whole: bool
    ) -> Attempt:
        who = lease.worker_id
        try:
            upstream = await self.client.post(f"{lease.url}{path}", raw, headers)
        except UpstreamError as exc:
            return Attempt(Outcome.FAILED, f"{who}: {exc}", refused=connection_refused(exc))
        outcome = classify(upstream.status_code)
        try:
            if outcome is not Outcome.ANSWERED or whole:
                body = await upstream.aread()
                upstream.close()
                if outcome is Outcome.FAILED:
                    detail = body[:200].decode(errors="replace")
                    return Attempt(outcome, f"{who}: HTTP {upstream.status_code} {detail}")
                return Attempt(outcome, f"{who}: HTTP {upstream.status_code}", upstream)
            rest = upstream.aiter_bytes()
            first = await anext(rest, b"")
        except UpstreamError as exc:
            # Nothing has reached the client yet, so another worker can still answer.
            upstream.close()
            return Attempt(Outcome.FAILED, f"{who}: {exc} (before its answer was in)")
        except BaseException:
            upstream.close()
            raise
        return Attempt(outcome, upstream=upstream, first=first, rest=rest)

    def _full(self, lease: Lease, attempt: Attempt) -> Response:
        """Every worker with room was tried: the last worker's own 429 goes to the client."""
        assert attempt.upstream is not None
        upstream = attempt.upstream
        media_type = upstream.headers.get("content-type")
        return Response(upstream.content, 429, self._headers(lease, upstream), media_type)

    @staticmethod
    def _headers(lease: Lease, upstream: UpstreamResponse) -> dict[str, str]:
        headers = {WORKER_HEADER: lease.worker_id}
        for name in ("retry-after", "x-rbee-tool-calls"):  # how tool calls were made
            if name in upstream.headers:
                headers[name] = upstream.headers[name]
        return headers

    def _respond(self, lease: Lease, attempt: Attempt, track: RequestTrack) -> Response:
        upstream = attempt.upstream
        assert upstream is not None
        headers = self._headers(lease, upstream)
        media_type = upstream.headers.get("content-type")
        if upstream.content is not None:
            # A whole answer goes out in one piece: cheaper than streaming it, and the worker's
            # slot is already free.
            self.router.release(lease)
            track.end(upstream.status_code)
            return Response(upstream.content, upstream.status_code, headers, media_type)
        return RelayResponse(
            Relay(self.router, lease, attempt, track),
            status_code=upstream.status_code,
            headers=headers,
            media_type=media_type,
        )
