"""Prometheus plumbing every daemon shares: one registry per app and the `/metrics` route.

Each app owns its registry (never prometheus_client's global one), so two apps in one test
process never mix their figures. Gauges that mirror state the daemon already keeps (slots,
queues, the registry) are read at scrape time by a collector instead of being updated on
every change: the request path pays nothing for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Request and first-token times of a local LLM cluster: tens of milliseconds to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Gaps between two tokens of one answer: a few milliseconds on a GPU, a few hundred on a CPU.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


def new_registry() -> CollectorRegistry:
    """A registry with the usual process figures (CPU seconds, memory, open files, GC)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class ScrapeCollector(Collector):
    """Adapts a function that yields metric families into a prometheus_client collector."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def gauge(
    name: str,
    documentation: str,
    labels: Sequence[str],
    values: Iterable[tuple[Sequence[str], float]],
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def metrics_router(registry: CollectorRegistry, *, in_thread: bool = False) -> APIRouter:
    """`GET /metrics` in Prometheus's text format. The app decides who may read it.

    Collectors that read loop-owned state (queues, slots) run on the loop; `in_thread` is for
    slow ones (the hive lists its processes), so they never stall it."""
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        if in_thread:
            body = await asyncio.to_thread(generate_latest, registry)
        else:
            body = generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
