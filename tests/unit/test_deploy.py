"""The Grafana dashboard in deploy/ charts only figures the daemons really export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rbee.contracts.hives import Device
from rbee.hive.metrics import HiveMetrics
from rbee.queen.hives import HiveRegistry
from rbee.queen.metrics import QueenMetrics
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker
from rbee.worker.metrics import WorkerMetrics
from rbee.worker.state import Identity, WorkerStatusBoard
from rbee_testing.metrics import parse_samples

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "rbee-dashboard.json"


def exported_names() -> set[str]:
    queen = QueenMetrics(WorkerRegistry(), HiveRegistry(90), LoadTracker(10), AdmissionQueue(1, 1))
    track = queen.track("m")  # so the labelled families have a series (labelled "(unknown)")
    track.streamed = True
    track.lease("w")
    track.failover()
    track.first_byte()
    track.end(200)
    queen.worker_started("m", "ready")
    identity = Identity("w", "m", "cpu:0", "127.0.0.1", 8080, None, 1)
    worker = WorkerMetrics(WorkerStatusBoard(identity), lambda: None)
    worker.timer().ended(None)
    device = Device(id="cpu:0", kind="cpu", name="cpu", memory_total_bytes=2, memory_free_bytes=1)
    hive_state: Any = SimpleNamespace(
        settings=SimpleNamespace(hive_id="h"),
        supervisor=SimpleNamespace(processes=list),
        devices=SimpleNamespace(devices=lambda: [device]),
        downloader=SimpleNamespace(progress=lambda: {"org/repo:f.gguf": (1, 2)}),
    )
    hive = HiveMetrics(hive_state)
    names: set[str] = set()
    for registry in (queen.registry, worker.registry, hive.registry):
        text = generate_latest(registry).decode()
        names |= {name for name, _ in parse_samples(text)}
        # Families with no series yet (no worker, no queue) are declared all the same.
        names |= {f.name for f in text_string_to_metric_families(text)}
    return names


def test_every_chart_reads_an_exported_figure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {name for expr in exprs for name in re.findall(r"\brbee_[a-z_]+", expr)}
    missing = used - exported_names()
    assert not missing, f"the dashboard charts figures nobody exports: {sorted(missing)}"
    # The figures the issue names are all charted.
    for name in (
        "rbee_requests_total",
        "rbee_time_to_first_token_seconds_bucket",
        "rbee_queue_waiting",
        "rbee_worker_generated_tokens_total",
        "rbee_worker_inter_token_seconds_bucket",
        "rbee_hive_device_memory_free_bytes",
        "rbee_hive_cpu_utilization",
    ):
        assert name in used, name
