"""Worker heartbeats in, the registry out (list, get, delete, live stream of changes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from rbee.clients.hive import HiveError
from rbee.common.errors import BadRequest, NotFound, quote
from rbee.contracts.workers import WORKER_ID_PATTERN, HeartbeatAck, WorkerHeartbeat, WorkerView
from rbee.queen.live import queen_view, snapshot, worker_json
from rbee.queen.operations import hive_failure
from rbee.queen.registry import ChangeKind, RegistryChange
from rbee.queen.routing.router import SERVING, pool_of
from rbee.queen.state import QueenState, get_state

router = APIRouter()
HEARTBEAT_MAX_BYTES = 64 * 1024  # a worker heartbeat is a few hundred bytes
State = Annotated[QueenState, Depends(get_state)]


def publish_change(state: QueenState, change: RegistryChange) -> None:
    if not state.bus.subscriber_count:
        return  # nobody listens: a busy worker's status flips cost no event building
    state.bus.publish(
        "worker",
        {
            "change": change.kind.value,
            "worker_id": change.worker.id,
            "model_id": change.worker.model_id,
            "state": "removed"
            if change.kind is ChangeKind.REMOVED
            else ("offline" if change.kind is ChangeKind.OFFLINE else change.worker.status.value),
            "worker": worker_json(state, change.worker),
        },
    )


def registry_changed(state: QueenState, change: RegistryChange) -> None:
    """Tell the listeners, and act on a worker that went away: requests still waiting for its
    first byte go elsewhere, and an early death counts against on-demand starts."""
    publish_change(state, change)
    worker_id = change.worker.id
    if change.kind in (ChangeKind.REGISTERED, ChangeKind.STATUS_CHANGED):
        if change.worker.status in SERVING:
            # Its keep-alive's clock starts once it serves: a load (minutes, for a big model) is
            # no idleness. Only the first time: its requests restart the clock after that.
            state.router.tracker.joined(worker_id)
    elif change.kind is ChangeKind.OFFLINE:
        state.router.depart(worker_id)
        state.router.lost(change.worker)
        state.spawner.worker_lost(worker_id, "stopped heartbeating")
    elif change.kind is ChangeKind.REMOVED:
        state.router.forget(worker_id)
        state.router.lost(change.worker)
        state.spawner.worker_stopped(worker_id)
    if change.kind in (ChangeKind.OFFLINE, ChangeKind.REMOVED):
        state.operations.helpers_released(change.worker)  # a split worker's RPC servers


@router.post(
    "/v1/worker-heartbeat",
    response_model=HeartbeatAck,
    max_body_size=HEARTBEAT_MAX_BYTES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": WorkerHeartbeat.model_json_schema()}},
        }
    },
)
async def worker_heartbeat(request: Request) -> Response:
    """The hottest endpoint: parsed straight from bytes by pydantic-core, answered without a
    second validation pass (about twice the heartbeats per second of the plain FastAPI way)."""
    try:
        heartbeat = WorkerHeartbeat.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
    state = get_state(request)
    state.metrics.heartbeats["worker"] += 1
    change = state.registry.update_worker(heartbeat)
    if change is not None:
        registry_changed(state, change)
    # A heartbeat may mean a free slot or a new worker: let the head of the line try again.
    state.router.admission.notify(pool_of(heartbeat.worker))
    ack = HeartbeatAck(status="ok", message=f"heartbeat from {heartbeat.worker.id} recorded")
    return Response(ack.model_dump_json(), media_type="application/json")


@router.get("/v1/workers")
async def list_workers(
    state: State,
    model_id: Annotated[str | None, Query(min_length=1)] = None,
    available: bool | None = None,
) -> dict[str, list[WorkerView]]:
    now = state.registry.now()
    views = [queen_view(state, r, now) for r in state.registry.records()]
    if model_id is not None:
        views = [v for v in views if v.model_id == model_id]
    if available is not None:
        views = [v for v in views if v.available == available]
    return {"workers": sorted(views, key=lambda v: v.id)}


@router.get("/v1/workers/{worker_id}")
async def get_worker(worker_id: str, state: State) -> WorkerView:
    record = state.registry.get_record(worker_id)
    if record is None:
        raise NotFound(f"no worker {quote(worker_id)} in the registry", code="worker_not_found")
    return queen_view(state, record, state.registry.now())


@router.delete("/v1/workers/{worker_id}")
async def delete_worker(worker_id: str, state: State) -> dict[str, Any]:
    info = state.registry.get_worker(worker_id)
    if info is None or not state.registry.remove_worker(worker_id):
        raise NotFound(f"no worker {quote(worker_id)} in the registry", code="worker_not_found")
    registry_changed(state, RegistryChange(ChangeKind.REMOVED, info))
    return {"removed": worker_id}


@router.get("/v1/heartbeats/stream")
async def heartbeat_stream(request: Request, state: State) -> EventSourceResponse:
    """SSE: `worker` events on every registry change, `hive` events on every hive heartbeat, a
    `summary` (the whole cluster) at once and every few seconds, `stats` (live figures) every
    `--stats-interval`."""

    async def events() -> AsyncIterator[ServerSentEvent]:
        async with state.bus.subscribe() as queue:
            yield ServerSentEvent(data=json.dumps(snapshot(state)), event="summary")
            interval = state.settings.summary_interval
            loop = asyncio.get_running_loop()
            next_summary = loop.time() + interval
            while True:
                try:
                    timeout = max(0.0, next_summary - loop.time())
                    name, data = await asyncio.wait_for(queue.get(), timeout)
                    yield ServerSentEvent(data=json.dumps(data), event=name)
                except TimeoutError:
                    next_summary = loop.time() + interval
                    yield ServerSentEvent(data=json.dumps(snapshot(state)), event="summary")

    return EventSourceResponse(events(), ping=15)


@router.get("/v1/workers/{worker_id}/log", response_class=PlainTextResponse)
async def worker_log(
    worker_id: str, state: State, lines: Annotated[int, Query(ge=1, le=100_000)] = 200
) -> PlainTextResponse:
    """The end of a worker's log, from its hive: a running worker's, or a stopped one's (asked
    of every hive online when the registry no longer knows the worker)."""
    if not WORKER_ID_PATTERN.match(worker_id):
        raise BadRequest(f"{quote(worker_id)} is not a valid worker id", param="worker_id")
    info = state.registry.get_worker(worker_id)
    hives = state.hives.online()
    if info is not None and info.hive_id:
        hives = [h for h in hives if h.id == info.hive_id] or hives
    for hive in hives:
        try:
            text = await state.hive_clients.get(hive).worker_log(worker_id, lines)
        except HiveError as exc:
            if exc.status == 404:
                continue
            raise hive_failure(exc) from None
        return PlainTextResponse(text)
    raise NotFound(
        f"no hive online has a log of worker {quote(worker_id)}", code="worker_log_not_found"
    )
