"""The queen's Prometheus figures: requests through it, and the cluster as its registry sees it.

The request path makes a handful of cheap calls on a `RequestTrack` (lease, first byte, end);
everything that mirrors state the queen keeps anyway (workers by status, requests in flight and
waiting, hives online) is read from that state when Prometheus scrapes, so it costs a request
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric

from rbee.common.metrics import LATENCY_BUCKETS, ScrapeCollector, gauge, new_registry
from rbee.contracts.workers import WorkerStatus
from rbee.queen.hives import HiveRegistry
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker

# What `rbee_workers{status}` counts: the lifecycle states, plus workers gone quiet.
WORKER_STATES = (*(s.value for s in WorkerStatus if s is not WorkerStatus.STOPPED), "offline")
# A request that ended before any worker answered it: `worker` is empty.
NO_WORKER = ""
# The client went away before an answer started (nginx's convention).
CLIENT_CLOSED = "499"


class QueenMetrics:
    def __init__(
        self,
        registry: WorkerRegistry,
        hives: HiveRegistry,
        tracker: LoadTracker,
        admission: AdmissionQueue,
    ) -> None:
        self._workers = registry
        self._hives = hives
        self._tracker = tracker
        self._admission = admission
        self.registry = r = new_registry()
        self.requests = Counter(
            "rbee_requests",
            "OpenAI requests through the queen, by model, the worker that answered and HTTP status",
            ["model", "worker", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "rbee_request_duration_seconds",
            "Time from a request's arrival at the queen to the end of its answer",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "rbee_time_to_first_token_seconds",
            "Time from a streamed request's arrival to the first byte of its answer",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rbee_queue_wait_seconds",
            "Time a request waited for a worker (admission queue or a cold start)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.heartbeats = Counter(
            "rbee_heartbeats",
            "Heartbeats received, by sender (worker or hive)",
            ["kind"],
            registry=r,
        )
        self.worker_heartbeats = self.heartbeats.labels("worker")
        self.hive_heartbeats = self.heartbeats.labels("hive")
        self.failovers = Counter(
            "rbee_failovers",
            "Requests sent on to another worker after one failed before answering",
            ["model"],
            registry=r,
        )
        self.worker_starts = Counter(
            "rbee_worker_starts",
            "Workers the queen asked a hive to start, by result (ready, failed, timeout)",
            ["model", "result"],
            registry=r,
        )
        r.register(ScrapeCollector(self.live))

    def track(self, model: str) -> RequestTrack:
        return RequestTrack(self, model, time.perf_counter())

    def worker_started(self, model: str, result: str) -> None:
        self.worker_starts.labels(model, result).inc()

    def live(self) -> Iterable[Metric]:
        """Gauges read from the queen's state at scrape time."""
        now = self._workers.now()
        records = self._workers.records()
        states = dict.fromkeys(WORKER_STATES, 0)
        for record in records:
            fresh = self._workers.is_fresh(record, now)
            states["offline" if not fresh else record.info.status.value] += 1
        yield gauge(
            "rbee_workers",
            "Workers in the registry by status (offline: not heard from within the timeout)",
            ["status"],
            (((status,), count) for status, count in states.items()),
        )
        yield gauge(
            "rbee_in_flight",
            "Requests the queen has sent to a worker and not yet finished",
            ["model", "worker"],
            (((r.info.model_id, r.info.id), self._tracker.in_flight(r.info.id)) for r in records),
        )
        yield gauge(
            "rbee_slots",
            "Requests a worker serves at once, as it announced to the queen",
            ["model", "worker"],
            (((r.info.model_id, r.info.id), r.info.slots) for r in records),
        )
        waiting = self._admission.waiting_by_model()
        for model in self._workers.models():
            waiting.setdefault(model, 0)
        yield gauge(
            "rbee_queue_waiting",
            "Requests waiting in the queen's admission queue for a free worker",
            ["model"],
            (((model,), count) for model, count in sorted(waiting.items())),
        )
        hives = self._hives.all()
        yield gauge(
            "rbee_hives_online",
            "Hives heard from within the timeout",
            [],
            [((), sum(1 for h in hives if h.online))],
        )
        yield gauge(
            "rbee_hives",
            "Hives the queen knows, online or not",
            [],
            [((), len(hives))],
        )


@dataclass(slots=True)
class RequestTrack:
    """One request's figures, recorded at a few points of its way through the proxy."""

    metrics: QueenMetrics
    model: str
    started: float
    worker: str = NO_WORKER
    leased: bool = False
    streamed: bool = False

    def lease(self, worker_id: str) -> None:
        if not self.leased:
            self.leased = True
            self.metrics.queue_wait.labels(self.model).observe(time.perf_counter() - self.started)
        self.worker = worker_id

    def failover(self) -> None:
        self.metrics.failovers.labels(self.model).inc()

    def first_byte(self) -> None:
        if self.streamed:
            self.metrics.ttft.labels(self.model).observe(time.perf_counter() - self.started)

    def end(self, code: int | str) -> None:
        metrics = self.metrics
        metrics.duration.labels(self.model).observe(time.perf_counter() - self.started)
        metrics.requests.labels(self.model, self.worker, str(code)).inc()

    def refused(self, code: int | str) -> None:
        """Ended without an answer from any worker (no worker, queue full, all failed...)."""
        self.worker = NO_WORKER
        self.end(code)
