"""A typed async client for the queen's HTTP API: registry, models, jobs and OpenAI inference.

Every failure is one of the `QueenError`s below, so a caller maps errors to advice in one place.
Pass `transport=` (an `httpx.ASGITransport` or `httpx.MockTransport`) to talk to an in-process app.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from rbee.clients.base import OwnedHttpClient
from rbee.contracts.errors import read_error
from rbee.contracts.events import ModelEvent, ModelEvents
from rbee.contracts.hives import HiveView
from rbee.contracts.jobs import JobCreated, JobEvent, JobRequest
from rbee.contracts.keys import ApiKeyInfo, KeyCreate, KeyCreated, KeyList
from rbee.contracts.openai import ModelBackoff, WorkerContext
from rbee.contracts.workers import WorkerView

DEFAULT_QUEEN_URL = "http://127.0.0.1:7833"


class QueenError(Exception):
    """Anything that went wrong talking to the queen; the message is meant for a person."""


class QueenUnreachable(QueenError):
    def __init__(self, url: str) -> None:
        super().__init__(f"no queen answers at {url}")
        self.url = url


class QueenHTTPError(QueenError):
    """The queen answered with an error status and (usually) an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class JobFailed(QueenError):
    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class ModelStatus(BaseModel):
    """rbee's extension of an OpenAI model entry: is it loaded, and where could it start."""

    state: str = "available"
    embedding: bool = False
    workers: int = 0
    hives: list[str] = Field(default_factory=list)
    backoff: list[ModelBackoff] = Field(default_factory=list)
    pinned: bool = False
    keep_alive_left_s: float | None = None
    last_used_s_ago: float | None = None
    queued: int = 0
    max_replicas: int | None = None
    min_replicas: int = 0
    worker_contexts: list[WorkerContext] = Field(default_factory=list)


class ModelEntry(BaseModel):
    id: str
    owned_by: str = "rbee"
    rbee: ModelStatus = Field(default_factory=ModelStatus)


_JOB_REQUEST: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)


def error_from_response(response: httpx.Response, body: bytes) -> QueenHTTPError:
    message, code = read_error(response.status_code, body)
    return QueenHTTPError(response.status_code, message, code)


async def sse_data(response: httpx.Response) -> AsyncGenerator[str, None]:
    """The `data:` payload of each server-sent event."""
    async for event in EventSource(response).aiter_sse():
        yield event.data


class QueenClient(OwnedHttpClient):
    def __init__(
        self,
        base_url: str = DEFAULT_QUEEN_URL,
        *,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        # Reads may wait long on a slow generation or a quiet job stream; connects must not.
        timeout = httpx.Timeout(timeout_s, read=None)
        super().__init__(base_url, token=token, transport=transport, timeout=timeout)

    # -- plumbing ------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        if response.is_error:
            raise error_from_response(response, response.content)
        try:
            return response.json()
        except ValueError as exc:
            raise QueenError(f"the queen sent something that is not JSON on {path}") from exc

    def _transport_error(self, exc: httpx.TransportError) -> QueenError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return QueenUnreachable(self.base_url)
        return QueenError(f"lost the connection to the queen at {self.base_url} ({exc})")

    async def _stream(
        self, method: str, path: str, json_body: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[tuple[httpx.Response, str], None]:
        try:
            async with self._http.stream(method, path, json=json_body) as response:
                if response.is_error:
                    raise error_from_response(response, await response.aread())
                async for data in sse_data(response):
                    yield response, data
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc

    # -- registry --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        data: dict[str, Any] = await self._request("GET", "/health")
        return data

    async def workers(self) -> list[WorkerView]:
        data = await self._request("GET", "/v1/workers")
        return [WorkerView.model_validate(w) for w in data.get("workers", [])]

    async def worker(self, worker_id: str) -> WorkerView:
        return WorkerView.model_validate(await self._request("GET", f"/v1/workers/{worker_id}"))

    async def worker_log(self, worker_id: str, lines: int = 200) -> str:
        """The end of a worker's log, from its hive (a stopped worker's too)."""
        try:
            response = await self._http.get(f"/v1/workers/{worker_id}/log", params={"lines": lines})
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        if response.is_error:
            raise error_from_response(response, response.content)
        return response.text

    async def model_events(self) -> list[ModelEvent]:
        """The last model loads and unloads, oldest first."""
        return ModelEvents.model_validate(await self._request("GET", "/v1/model-events")).events

    async def hives(self) -> list[HiveView]:
        data = await self._request("GET", "/v1/hives")
        return [HiveView.model_validate(h) for h in data.get("hives", [])]

    async def models(self) -> list[ModelEntry]:
        data = await self._request("GET", "/v1/models")
        try:
            return [ModelEntry.model_validate(m) for m in data.get("data", [])]
        except ValidationError as exc:
            raise QueenError(f"the queen's model list is not understood: {exc}") from exc

    async def watch(self) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """The live stream of the cluster: (event name, data) as the queen sends them."""
        try:
            async with self._http.stream("GET", "/v1/heartbeats/stream") as response:
                if response.is_error:
                    raise error_from_response(response, await response.aread())
                async for event in EventSource(response).aiter_sse():
                    try:
                        data = json.loads(event.data)
                    except ValueError:
                        continue
                    if isinstance(data, dict):
                        yield event.event, data
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc

    # -- jobs ------------------------------------------------------------------------------

    async def create_job(self, request: JobRequest) -> JobCreated:
        body = _JOB_REQUEST.dump_python(request, mode="json", exclude_none=True)
        return JobCreated.model_validate(await self._request("POST", "/v1/jobs", json=body))

    async def job_events(self, job: JobCreated) -> AsyncGenerator[JobEvent, None]:
        """The job's events until its final one (`done` or `error`)."""
        async with aclosing(self._stream("GET", job.sse_url)) as stream:
            async for _, data in stream:
                try:
                    event = JobEvent.model_validate_json(data)
                except ValidationError:
                    continue  # keep-alives and events from a newer queen are not ours to fail on
                yield event
                if event.final:
                    return
        raise JobFailed(job.job_id, f"job {job.job_id} ended without a result")

    async def cancel_job(self, job_id: str) -> None:
        await self._request("DELETE", f"/v1/jobs/{job_id}")

    async def run_job(self, request: JobRequest) -> dict[str, Any]:
        """Create a job, wait for its end, return its result; an `error` event raises JobFailed."""
        job = await self.create_job(request)
        async with aclosing(self.job_events(job)) as events:
            async for event in events:
                if event.type == "error":
                    raise JobFailed(job.job_id, event.message or "the job failed")
                if event.type == "done":
                    return event.result or {}
        raise JobFailed(job.job_id, "unreachable")  # pragma: no cover - job_events raises first

    # -- API keys --------------------------------------------------------------------------

    async def create_key(self, name: str, expires_days: int | None = None) -> KeyCreated:
        body = KeyCreate(name=name, expires_days=expires_days).model_dump(exclude_none=True)
        return KeyCreated.model_validate(await self._request("POST", "/v1/keys", json=body))

    async def keys(self) -> list[ApiKeyInfo]:
        return KeyList.model_validate(await self._request("GET", "/v1/keys")).keys

    async def revoke_key(self, name: str) -> None:
        await self._request("DELETE", f"/v1/keys/{name}")

    # -- inference -------------------------------------------------------------------------

    async def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        stats: AnswerStats | None = None,
        **params: Any,
    ) -> str:
        body = {"model": model, "messages": messages, "stream": False, **params}
        data = await self._request("POST", "/v1/chat/completions", json=body)
        if stats is not None:
            stats.note(data)
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise QueenError("the queen's answer has no message in it") from exc

    async def chat_stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        stats: AnswerStats | None = None,
        **params: Any,
    ) -> AsyncGenerator[str, None]:
        """The answer's text as it is generated, piece by piece; with `stats`, its token counts
        (the usage chunk, asked for) and why it ended are noted there."""
        body = {"model": model, "messages": messages, "stream": True, **params}
        if stats is not None:
            body["stream_options"] = {"include_usage": True}
        async with aclosing(self._stream("POST", "/v1/chat/completions", body)) as stream:
            async for response, data in stream:
                if data.strip() == "[DONE]":
                    return
                texts = _chunk_texts(response, data)
                if stats is not None:
                    with contextlib.suppress(ValueError):
                        stats.note(json.loads(data))
                for text in texts:
                    yield text


@dataclass
class AnswerStats:
    """What an answer says about itself: its tokens (`usage`) and why it ended."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None

    def note(self, data: Any) -> None:
        """Take what a whole answer, or one chunk of a stream, says."""
        if not isinstance(data, dict):
            return
        usage = data.get("usage")
        if isinstance(usage, dict):
            for name in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(name), int):
                    setattr(self, name, usage[name])
        for choice in data.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]


def _chunk_texts(response: httpx.Response, data: str) -> list[str]:
    """The text pieces of one streamed chat chunk; an error chunk raises."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return []
    if not isinstance(chunk, dict):
        return []
    if isinstance(chunk.get("error"), dict):
        error = chunk["error"]
        raise QueenHTTPError(
            response.status_code, str(error.get("message", "error")), error.get("code")
        )
    texts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        text = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(text, str) and text:
            texts.append(text)
    return texts
