"""What the queen's live stream (`GET /v1/heartbeats/stream`) carries besides registry changes:
a snapshot of the whole cluster, and, while someone watches, live figures.

The figures come from the queen's own counters (requests, first-token times, queues) and, for
tokens per second, from the workers' own `/metrics`: the queen relays answers byte for byte and
never counts tokens itself. Workers are only read while a stream is open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rbee.clients.worker import WorkerClient
from rbee.contracts.apis import served_apis
from rbee.contracts.openai import ModelBackoff, ModelCard, ModelServing, WorkerContext
from rbee.contracts.workers import WorkerInfo, WorkerStatus, WorkerView
from rbee.queen.registry import WorkerRecord, worker_view
from rbee.queen.routing.router import SERVING
from rbee.queen.scheduler.lifecycle import IdleSnapshot, keep_alive_left
from rbee.queen.state import QueenState

log = logging.getLogger("rbee.queen.live")
WORKER_SCRAPE_TIMEOUT_S = 1.0


def apis_of(workers: int, embedding_workers: int, rerank_workers: int = 0) -> list[str]:
    """A loaded model's APIs are its workers'; one not loaded yet may be started for any (but
    reranking, which needs a reranker model: known once one of its workers says so). A
    reranker's workers are embedding workers that rerank instead."""
    if not workers:
        return served_apis(chat=True, embedding=True)
    return served_apis(
        chat=workers > embedding_workers,
        embedding=embedding_workers > rerank_workers,
        rerank=rerank_workers > 0,
    )


def model_entries(state: QueenState) -> list[dict[str, Any]]:
    """Models an online worker serves (`loaded`), models a worker is being started for while
    none serves yet (`loading`), and models a live hive could start (`available`);
    `embedding` says a worker of the model answers `/v1/embeddings`."""
    now = state.registry.now()
    workers: Counter[str] = Counter()
    embedding: Counter[str] = Counter()
    rerank: Counter[str] = Counter()
    loading = set(state.spawner.loading)
    contexts: dict[str, list[WorkerContext]] = {}
    for record in state.registry.records():
        if not state.registry.is_fresh(record, now):
            continue
        if record.info.status in SERVING:
            info = record.info
            contexts.setdefault(info.model_id, []).append(
                WorkerContext(
                    worker_id=info.id,
                    hive_id=info.hive_id,
                    ctx_size=info.ctx_size,
                    slots=info.slots,
                )
            )
            workers[record.info.model_id] += 1
            embedding[record.info.model_id] += record.info.embedding
            rerank[record.info.model_id] += record.info.rerank
        elif record.info.status is WorkerStatus.STARTING:
            loading.add(record.info.model_id)
    idle: dict[str, list[IdleSnapshot]] = {}
    for snap in state.idle.snapshots():
        idle.setdefault(snap.model, []).append(snap)
    queued = state.router.admission.waiting_by_model()
    hives: dict[str, list[str]] = {}
    for hive in state.hives.all():
        if hive.online:
            for model in hive.models:
                hives.setdefault(model, []).append(hive.id)
    cards = [
        ModelCard(
            id=model,
            created=0,
            rbee=ModelServing(
                state=(
                    "loaded" if workers[model] else "loading" if model in loading else "available"
                ),
                embedding=embedding[model] > 0,
                workers=workers[model],
                embedding_workers=embedding[model],
                hives=sorted(hives.get(model, [])),
                apis=apis_of(workers[model], embedding[model], rerank[model]),
                backoff=backoff_of(state, model),
                queued=queued.get(model, 0),
                max_replicas=state.settings.max_replicas_of(model),
                min_replicas=state.settings.min_replicas_of(model),
                worker_contexts=contexts.get(model, []),
                **keep_alive_of(idle.get(model, []), now, state.settings.min_replicas_of(model)),
            ),
        )
        for model in sorted(set(workers) | set(hives))
    ]
    return [card.model_dump(mode="json") for card in cards]


def keep_alive_of(workers: list[IdleSnapshot], now: float, min_replicas: int = 0) -> dict[str, Any]:
    """A model's keep-alive figures over its loaded workers (see `ModelServing`); with
    `min_replicas` its last workers never unload, so no time is left to show."""
    if not workers:
        return {}
    pinned = any(w.pinned for w in workers)
    kept = pinned or min_replicas > 0
    left = None if kept else round(max(keep_alive_left(w, now) for w in workers), 1)
    ago = max(0.0, min(0.0 if w.busy else now - w.idle_since for w in workers))
    return {"pinned": pinned, "keep_alive_left_s": left, "last_used_s_ago": round(ago, 1)}


def backoff_of(state: QueenState, model: str) -> list[ModelBackoff]:
    """Why starting a worker for the model is on hold, hive by hive (empty if it is not)."""
    backoff = state.spawner.backoff
    return [
        ModelBackoff(
            hive_id=h.hive_id,
            failures=h.failures,
            reason=h.reason,
            retry_in_s=round(backoff.remaining_s(h), 1),
        )
        for h in backoff.holds(model)
    ]


def queen_view(state: QueenState, record: WorkerRecord, now: float) -> WorkerView:
    """A worker as the queen shows it: one being unloaded (no new requests, those in flight
    finishing) is `stopping` before the worker itself says so."""
    view = worker_view(state.registry, record, now)
    if state.router.retiring(view.id) and view.status in SERVING:
        return view.model_copy(update={"status": WorkerStatus.STOPPING, "available": False})
    return view


def worker_json(state: QueenState, info: WorkerInfo) -> dict[str, Any]:
    """A worker as `/v1/workers` shows it; one already removed shows its last known fields."""
    record = state.registry.get_record(info.id)
    if record is None:
        return {**info.model_dump(mode="json"), "online": False, "available": False}
    return queen_view(state, record, state.registry.now()).model_dump(mode="json")


def snapshot(state: QueenState) -> dict[str, Any]:
    """The `summary` event: counts (as before), plus every worker, hive and model."""
    registry = state.registry
    now = registry.now()
    workers = [queen_view(state, r, now) for r in registry.records()]
    hives = state.hives.all()
    return {
        "total": len(workers),
        "online": sum(1 for w in workers if w.online),
        "available": sum(1 for w in workers if w.available),
        "hives_online": sum(1 for h in hives if h.online),
        "workers": [w.model_dump(mode="json") for w in sorted(workers, key=lambda w: w.id)],
        "hives": [h.model_dump(mode="json") for h in sorted(hives, key=lambda h: h.id)],
        "models": model_entries(state),
    }


def _generated_tokens(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "rbee_worker_generated_tokens_total"
    )


class StatsSampler:
    """Turns counters into rates between two samples (the `stats` event)."""

    def __init__(self, state: QueenState, http: httpx.AsyncClient) -> None:
        self.state = state
        self.http = http
        self._at = time.monotonic()
        self._requests = self._ttft_sum = self._ttft_count = 0.0
        self._tokens: dict[str, float] = {}

    def _read_queen(self) -> tuple[float, float, float]:
        metrics = self.state.metrics
        return (metrics.requests_total(), *metrics.ttft_totals())

    async def _worker_tokens(self) -> dict[str, float]:
        now = self.state.registry.now()
        online = [
            r.info for r in self.state.registry.records() if self.state.registry.is_fresh(r, now)
        ]

        async def read(info: WorkerInfo) -> tuple[str, float | None]:
            client = WorkerClient(info.url, self.http, self.state.settings.token)
            try:
                return info.id, _generated_tokens(await client.metrics(WORKER_SCRAPE_TIMEOUT_S))
            except Exception as exc:  # a worker that cannot answer just has no figure now
                log.debug("no metrics from worker %s: %s", info.id, exc)
                return info.id, None

        found = await asyncio.gather(*(read(info) for info in online))
        return {worker_id: tokens for worker_id, tokens in found if tokens is not None}

    async def sample(self) -> dict[str, Any]:
        requests, ttft_sum, ttft_count = self._read_queen()
        tokens = await self._worker_tokens()
        now = time.monotonic()
        elapsed = max(now - self._at, 1e-6)
        per_worker: dict[str, float] = {}
        for worker_id, total in tokens.items():
            previous = self._tokens.get(worker_id)
            if previous is not None:
                # A restarted worker starts counting from zero again.
                per_worker[worker_id] = max(0.0, total - previous if total >= previous else total)
        new_ttft = ttft_count - self._ttft_count
        stats = {
            "requests_per_s": round((requests - self._requests) / elapsed, 3),
            "ttft_s": round((ttft_sum - self._ttft_sum) / new_ttft, 4) if new_ttft else None,
            "tokens_per_s": round(sum(per_worker.values()) / elapsed, 2),
            "worker_tokens_per_s": {k: round(v / elapsed, 2) for k, v in per_worker.items()},
            "queue": sum(self.state.router.admission.waiting_by_model().values()),
            "in_flight": sum(
                self.state.router.tracker.in_flight(r.info.id)
                for r in self.state.registry.records()
            ),
            "requests_total": requests,
        }
        self._at, self._requests = now, requests
        self._ttft_sum, self._ttft_count = ttft_sum, ttft_count
        self._tokens = tokens
        return stats


async def stats_loop(state: QueenState, interval_s: float) -> None:
    """Publish a `stats` event every interval while anyone listens to the stream."""
    sampler: StatsSampler | None = None
    # Its own small client: the proxy's is tuned for relaying answers, not for scrapes.
    async with httpx.AsyncClient(timeout=WORKER_SCRAPE_TIMEOUT_S) as http:
        while True:
            await asyncio.sleep(interval_s)
            if not state.bus.subscriber_count:
                sampler = None  # start afresh: a rate over an unwatched gap means nothing
                continue
            if sampler is None:
                sampler = StatsSampler(state, http)
                await sampler.sample()  # the first sample only sets the baseline
                continue
            state.bus.publish("stats", await sampler.sample())
