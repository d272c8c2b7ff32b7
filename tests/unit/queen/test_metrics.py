"""The queen's request tallies come out as proper Prometheus histograms and counters."""

from __future__ import annotations

from prometheus_client import generate_latest

from rbee.contracts.hives import HiveHeartbeat
from rbee.queen.hives import HiveRegistry
from rbee.queen.metrics import UNKNOWN_MODEL, QueenMetrics, Tally
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker
from rbee_testing.metrics import parse_samples, value
from rbee_testing.worker_servers import hive_beat


def test_buckets_are_cumulative_and_include_their_bound() -> None:
    tally = Tally()
    for seconds in (0.005, 0.006, 0.3, 1000.0):
        tally.observe(seconds)
    buckets = dict(tally.buckets())
    assert buckets["0.005"] == 1  # `le`: a value equal to the bound is in that bucket
    assert buckets["0.01"] == 2
    assert buckets["0.25"] == 2
    assert buckets["0.5"] == 3
    assert buckets["300.0"] == 3
    assert buckets["+Inf"] == 4 == tally.count
    assert tally.total == 0.005 + 0.006 + 0.3 + 1000.0


def hive_with(*models: str) -> HiveRegistry:
    hives = HiveRegistry(90)
    hives.update(HiveHeartbeat.model_validate(hive_beat(models)))
    return hives


def test_a_tracked_request_shows_in_every_family() -> None:
    metrics = QueenMetrics(WorkerRegistry(), hive_with("m"), LoadTracker(10), AdmissionQueue(1, 1))
    track = metrics.track("m")
    track.streamed = True
    track.lease("w1")
    track.failover()
    track.lease("w2")
    track.first_byte()
    track.end(200)
    metrics.track("m").refused(429)
    metrics.worker_started("m", "ready")
    samples = parse_samples(generate_latest(metrics.registry).decode())
    assert value(samples, "rbee_requests_total", model="m", worker="w2", code="200") == 1
    assert value(samples, "rbee_requests_total", model="m", worker="", code="429") == 1
    assert value(samples, "rbee_failovers_total", model="m") == 1
    assert value(samples, "rbee_queue_wait_seconds_count", model="m") == 1  # the first lease
    assert value(samples, "rbee_time_to_first_token_seconds_count", model="m") == 1
    assert value(samples, "rbee_request_duration_seconds_count", model="m") == 2
    assert value(samples, "rbee_request_duration_seconds_bucket", model="m", le="+Inf") == 2
    assert value(samples, "rbee_worker_starts_total", model="m", result="ready") == 1
    assert metrics.requests_total() == 2


def test_models_nobody_has_share_one_label() -> None:
    """A `model` label only ever names a model of the cluster: any name a client makes up is
    counted under one label, so made-up names cannot grow the figures."""
    metrics = QueenMetrics(WorkerRegistry(), hive_with("m"), LoadTracker(10), AdmissionQueue(1, 1))
    for n in range(50):
        metrics.track(f"made-up-{n}").refused(404)
    metrics.track("m").refused(503)
    samples = parse_samples(generate_latest(metrics.registry).decode())
    assert value(samples, "rbee_requests_total", model=UNKNOWN_MODEL, code="404") == 50
    assert value(samples, "rbee_requests_total", model="m", code="503") == 1
    models = {dict(labels).get("model") for _, labels in samples}
    assert models - {None} == {"m", UNKNOWN_MODEL}
