"""The queen's Prometheus figures: requests through it, and the cluster as its registry sees it.

The request path pays almost nothing: a `RequestTrack` adds to plain Python counters and bucket
tallies (all on the event loop's thread, so no locks), a few times per request (lease, first
byte, end); they become Prometheus counters and histograms only when Prometheus scrapes. What
mirrors state the queen keeps anyway (workers by status, requests in flight and waiting, hives
online) is read from that state at scrape time.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

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
# The `model` label of requests for a model the cluster does not know: the name comes from the
# client, and a label per name would let anyone grow the queen's figures without bound.
UNKNOWN_MODEL = "(unknown)"
_BOUNDS = tuple(float(b) for b in LATENCY_BUCKETS)
# Loading a model takes from a second (a small one, cached) to many minutes (a big one).
LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Tally:
    """One histogram's series: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_BOUNDS, seconds)] += 1  # `le` buckets: bound included
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, running = [], 0
        for bound, count in zip((*map(str, _BOUNDS), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        return cumulative

    @property
    def count(self) -> int:
        return sum(self.counts)


class ModelFigures:
    """Everything recorded per model, looked up once per request."""

    __slots__ = ("cached_tokens", "duration", "failovers", "prompt_tokens", "queue_wait", "ttft")

    def __init__(self) -> None:
        self.duration = Tally()
        self.ttft = Tally()
        self.queue_wait = Tally()
        self.failovers = 0
        # Of the answers that report usage: prompt tokens, and those served from KV cache.
        self.prompt_tokens = 0
        self.cached_tokens = 0


class QueenMetrics:
    def __init__(
        self,
        registry: WorkerRegistry,
        hives: HiveRegistry,
        tracker: LoadTracker,
        admission: AdmissionQueue,
        *,
        decisions: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self._workers = registry
        # The router's (policy, outcome) -> decisions, read at scrape time.
        self._decisions: Mapping[tuple[str, str], int] = {} if decisions is None else decisions
        self._hives = hives
        self._tracker = tracker
        self._admission = admission
        self.models: defaultdict[str, ModelFigures] = defaultdict(ModelFigures)
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.heartbeats = {"worker": 0, "hive": 0}
        self.registry = r = new_registry()
        # Rare enough for prometheus_client's own counter.
        self.worker_starts = Counter(
            "rbee_worker_starts",
            "Workers the queen asked a hive to start, by result (ready, failed, timeout)",
            ["model", "result"],
            registry=r,
        )
        self.model_loads = Counter(
            "rbee_model_loads",
            "Workers loaded for a model, by reason (demand: a request needed it; manual)",
            ["model", "reason"],
            registry=r,
        )
        self.model_unloads = Counter(
            "rbee_model_unloads",
            "Workers unloaded, by reason (idle: past their keep-alive; evicted; manual)",
            ["model", "reason"],
            registry=r,
        )
        self.model_swaps = Counter(
            "rbee_model_swaps",
            "Evictions done to load another model (a model that fit nowhere took their room)",
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "rbee_model_load_seconds",
            "Time from asking a hive to start a worker to the worker being ready",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        r.register(ScrapeCollector(self.recorded))
        r.register(ScrapeCollector(self.live))

    def track(self, model: str) -> RequestTrack:
        """Figures for a request for `model`, under its own label only if the cluster knows it
        (a worker serves it or a hive has it), so labels only ever name real models."""
        known = self._workers.records_for_model(model) or any(
            model in hive.models for hive in self._hives.all()
        )
        label = model if known else UNKNOWN_MODEL
        return RequestTrack(self, label, self.models[label], time.perf_counter())

    def worker_started(self, model: str, result: str) -> None:
        self.worker_starts.labels(model, result).inc()

    def model_loaded(self, model: str, reason: str, seconds: float) -> None:
        """Only models a hive started, so only models the cluster knows, name a label."""
        self.model_loads.labels(model, reason).inc()
        self.model_load_seconds.labels(model).observe(seconds)

    def model_unloaded(self, model: str, reason: str) -> None:
        self.model_unloads.labels(model, reason).inc()

    def model_swapped(self) -> None:
        self.model_swaps.inc()

    def recorded(self) -> Iterable[Metric]:
        """The request path's tallies, as Prometheus counters and histograms."""
        requests = CounterMetricFamily(
            "rbee_requests",
            "OpenAI requests through the queen, by model, the worker that answered and HTTP status",
            labels=["model", "worker", "code"],
        )
        for key, count in list(self.requests.items()):
            requests.add_metric(list(key), count)
        yield requests
        heartbeats = CounterMetricFamily(
            "rbee_heartbeats", "Heartbeats received, by sender (worker or hive)", labels=["kind"]
        )
        for kind, count in self.heartbeats.items():
            heartbeats.add_metric([kind], count)
        yield heartbeats
        models = list(self.models.items())
        failovers = CounterMetricFamily(
            "rbee_failovers",
            "Requests sent on to another worker after one failed before answering",
            labels=["model"],
        )
        for model, figures in models:
            failovers.add_metric([model], figures.failovers)
        yield failovers
        decisions = CounterMetricFamily(
            "rbee_route_decisions",
            "Workers chosen for requests, by routing policy and why (prefix_hit: it holds the "
            "longest part of the prompt; session; least_loaded: none holds any; overloaded: "
            "the one that holds it was too busy; least_loaded/round_robin under those policies)",
            labels=["policy", "outcome"],
        )
        for (policy, outcome), count in sorted(self._decisions.items()):
            decisions.add_metric([policy, outcome], count)
        yield decisions
        for name, attr, documentation in (
            (
                "rbee_prompt_tokens",
                "prompt_tokens",
                "Prompt tokens of the answers that reported usage (every whole answer; a stream "
                "when usage was asked for)",
            ),
            (
                "rbee_prompt_tokens_cached",
                "cached_tokens",
                "Of rbee_prompt_tokens, those the worker found in its KV cache (not computed)",
            ),
        ):
            tokens = CounterMetricFamily(name, documentation, labels=["model"])
            for model, figures in models:
                tokens.add_metric([model], getattr(figures, attr))
            yield tokens
        for name, attr, documentation in (
            (
                "rbee_request_duration_seconds",
                "duration",
                "Time from a request's arrival at the queen to the end of its answer",
            ),
            (
                "rbee_time_to_first_token_seconds",
                "ttft",
                "Time from a streamed request's arrival to the first byte of its answer",
            ),
            (
                "rbee_queue_wait_seconds",
                "queue_wait",
                "Time a request waited for a worker (admission queue or a cold start)",
            ),
        ):
            family = HistogramMetricFamily(name, documentation, labels=["model"])
            for model, figures in models:
                tally: Tally = getattr(figures, attr)
                family.add_metric([model], tally.buckets(), sum_value=tally.total)
            yield family

    def requests_total(self) -> int:
        return sum(self.requests.values())

    def ttft_totals(self) -> tuple[float, int]:
        """Summed first-token seconds and how many, over every model."""
        figures = list(self.models.values())
        return sum(f.ttft.total for f in figures), sum(f.ttft.count for f in figures)

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
    label: str  # the model, or UNKNOWN_MODEL
    figures: ModelFigures
    started: float
    worker: str = NO_WORKER
    leased: bool = False
    streamed: bool = False

    def lease(self, worker_id: str) -> None:
        if not self.leased:
            self.leased = True
            self.figures.queue_wait.observe(time.perf_counter() - self.started)
        self.worker = worker_id

    def failover(self) -> None:
        self.figures.failovers += 1

    def prompt_usage(self, prompt_tokens: int, cached_tokens: int) -> None:
        """The answer's usage: its prompt tokens, and how many came from the KV cache."""
        self.figures.prompt_tokens += prompt_tokens
        self.figures.cached_tokens += cached_tokens

    def first_byte(self) -> None:
        if self.streamed:
            self.figures.ttft.observe(time.perf_counter() - self.started)

    def end(self, code: int | str) -> None:
        self.figures.duration.observe(time.perf_counter() - self.started)
        self.metrics.requests[self.label, self.worker, str(code)] += 1

    def refused(self, code: int | str) -> None:
        """Ended without an answer from any worker (no worker, queue full, all failed...)."""
        self.worker = NO_WORKER
        self.end(code)
