"""The OpenAI front door: find a worker for the request's model and stream its answer back.

Bytes pass through as they arrive. A worker that fails before the first byte is benched and the
request goes to another; after the first byte the client gets an error event and the stream
ends. A client that goes away cancels the upstream request, which frees the worker's slot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from rbee.common.errors import (
    BadGateway,
    BadRequest,
    NotFound,
    RbeeError,
    TooManyRequests,
    Unavailable,
)
from rbee.common.gate import API_KEY_SCOPE
from rbee.common.tokens import auth_headers
from rbee.contracts.errors import ErrorBody
from rbee.queen.hives import HiveRegistry
from rbee.queen.metrics import CLIENT_CLOSED, QueenMetrics, RequestTrack
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import QueueFull, WaitExpired
from rbee.queen.routing.router import Lease, Router
from rbee.queen.scheduler.placement import hives_with_model
from rbee.queen.scheduler.spawner import Spawner
from rbee.queen.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from rbee.queen.usage import metered_stream, request_usage, total_tokens

log = logging.getLogger("rbee.queen.proxy")
WORKER_HEADER = "x-rbee-worker-id"
PASSED_REQUEST_HEADERS = ("content-type", "accept", "x-request-id")


def parse_body(raw: bytes) -> tuple[str, bool]:
    """The two fields the queen needs: `model` and `stream`. Everything else passes through."""
    try:
        payload: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required and must be a non-empty string", code="missing_model")
    return model, payload.get("stream") is True


def sse_error(message: str) -> bytes:
    body = ErrorBody.of(message, "server_error", "worker_failed").model_dump()
    return f"data: {json.dumps(body)}\n\n".encode()


def _wrong_kind(model: str, embedding: bool) -> BadRequest:
    if embedding:
        return BadRequest(
            f"model {model!r} is served for chat and completions only; embeddings need a "
            "worker started for them (rbee worker spawn --embedding)",
            code="model_not_embedding",
            param="model",
        )
    return BadRequest(
        f"model {model!r} is served for embeddings only (POST /v1/embeddings)",
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

    def known_models(self) -> list[str]:
        served = set(self.registry.models())
        for hive in self.hives.all():
            if hive.online:
                served.update(hive.models)
        return sorted(served)

    async def lease(
        self, model: str, exclude: Collection[str] = (), *, embedding: bool = False
    ) -> Lease:
        if not self.router.has_live_worker(model, exclude, embedding=embedding):
            of_model = self.registry.find_workers_by_model(model)
            known_workers = [w for w in of_model if w.embedding is embedding]
            if not known_workers and hives_with_model(self.hives.all(), model):
                # Cold model: start one. Never after failures, so a broken worker cannot make
                # the queen start worker after worker.
                await self.spawner.ensure_worker(model, embedding=embedding)
            elif known_workers:
                failed = f" ({', '.join(exclude)} failed)" if exclude else ""
                raise Unavailable(
                    f"no worker for model {model!r} is reachable right now{failed}",
                    code="no_worker",
                )
            elif of_model:
                raise _wrong_kind(model, embedding)
            else:
                known = ", ".join(self.known_models()) or "none"
                raise NotFound(
                    f"model {model!r} is not served by any worker and no hive has it "
                    f"(models: {known})",
                    code="model_not_found",
                )
        admission = self.router.admission
        try:
            return await self.router.acquire(model, exclude, embedding=embedding)
        except QueueFull:
            raise TooManyRequests(
                f"all workers for {model!r} are busy and {admission.max_waiting} requests "
                "already wait",
                retry_after_s=2,
                code="queue_full",
            ) from None
        except WaitExpired:
            raise TooManyRequests(
                f"no worker for {model!r} freed up within {admission.max_wait_s:.0f}s",
                retry_after_s=2,
                code="queue_timeout",
            ) from None

    async def forward(self, request: Request, path: str, *, embedding: bool = False) -> Response:
        """`embedding`: the request goes to the model's embedding workers (`/v1/embeddings`)."""
        raw = await request.body()
        model, stream = parse_body(raw)
        track = self.metrics.track(model)
        track.streamed = stream
        try:
            return await self._forward(track, path, raw, request, embedding)
        except RbeeError as exc:
            track.refused(exc.status_code)
            raise
        except BaseException:
            track.refused(CLIENT_CLOSED)
            raise

    async def _forward(
        self, track: RequestTrack, path: str, raw: bytes, request: Request, embedding: bool
    ) -> Response:
        model = track.model
        key: str | None = request.scope.get(API_KEY_SCOPE)
        keep_usage = True
        if key is not None and track.streamed:
            raw, keep_usage = request_usage(raw)
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_REQUEST_HEADERS}
        headers.update(auth_headers(self.token))
        tried: list[str] = []
        reason = ""
        for _ in range(self.retries + 1):
            lease = await self.lease(model, tried, embedding=embedding)
            track.lease(lease.worker_id)
            try:
                outcome = await self._attempt(lease, path, raw, headers, not track.streamed)
            except BaseException:
                # The client left while we waited for the worker, or something unforeseen: the
                # slot must not stay counted as busy.
                self.router.release(lease)
                raise
            if isinstance(outcome, UpstreamResponse):
                response = self._respond(lease, outcome, track)
                if key is not None:  # tokens served to an API key are counted
                    if isinstance(response, StreamingResponse):
                        response.body_iterator = metered_stream(
                            response.body_iterator,  # type: ignore[arg-type]  # _relay: bytes
                            keep_usage_chunk=keep_usage,
                            record=lambda tokens: self.usage(key, tokens),
                        )
                    elif (tokens := total_tokens(outcome.content or b"")) is not None:
                        self.usage(key, tokens)
                return response
            reason = outcome
            log.warning("worker failed before answering, trying another: %s", reason)
            self.router.fail(lease)
            tried.append(lease.worker_id)
            track.failover()
        raise BadGateway(f"{len(tried)} worker(s) failed for {model!r}; last: {reason}")

    async def _attempt(
        self, lease: Lease, path: str, raw: bytes, headers: dict[str, str], whole: bool
    ) -> UpstreamResponse | str:
        """The worker's response if it answered below 500 (read to the end if `whole`), or why
        it failed."""
        try:
            upstream = await self.client.post(f"{lease.url}{path}", raw, headers)
        except UpstreamError as exc:
            return f"{lease.worker_id}: {exc}"
        if upstream.status_code < 500 and not whole:
            return upstream
        try:
            body = await upstream.aread()
        except UpstreamError as exc:
            # Nothing has reached the client yet, so another worker can still answer.
            upstream.close()
            return f"{lease.worker_id}: {exc} (before its answer was complete)"
        upstream.close()
        if upstream.status_code < 500:
            return upstream
        detail = body[:200].decode(errors="replace")
        return f"{lease.worker_id}: HTTP {upstream.status_code} {detail}"

    def _respond(self, lease: Lease, upstream: UpstreamResponse, track: RequestTrack) -> Response:
        headers = {WORKER_HEADER: lease.worker_id}
        for name in ("retry-after",):
            if name in upstream.headers:
                headers[name] = upstream.headers[name]
        media_type = upstream.headers.get("content-type")
        if upstream.content is not None:
            # A whole answer goes out in one piece: cheaper than streaming it, and the worker's
            # slot is already free.
            self.router.release(lease)
            track.end(upstream.status_code)
            return Response(upstream.content, upstream.status_code, headers, media_type)
        return StreamingResponse(
            self._relay(lease, upstream, track),
            status_code=upstream.status_code,
            headers=headers,
            media_type=media_type,
        )

    async def _relay(
        self, lease: Lease, upstream: UpstreamResponse, track: RequestTrack
    ) -> AsyncIterator[bytes]:
        failed = False
        first = True
        try:
            async for chunk in upstream.aiter_bytes():
                if first:
                    first = False
                    track.first_byte()
                yield chunk
        except UpstreamError as exc:
            failed = True
            log.warning("worker %s failed mid-answer: %s", lease.worker_id, exc)
            if track.streamed:
                yield sse_error(f"worker {lease.worker_id} failed mid-stream: {type(exc).__name__}")
        finally:
            # Free the slot first: when the client has gone, this runs under cancellation.
            if failed:
                self.router.fail(lease)
            else:
                self.router.release(lease)
            # A stream cut by its worker counts as a bad gateway, whatever status went out.
            track.end(BadGateway.status_code if failed else upstream.status_code)
            upstream.close()
