"""The hive's Prometheus figures, all read when Prometheus scrapes: its workers as the operating
system lists them, its devices' memory, the machine's CPU load and downloads under way."""

from __future__ import annotations

from collections.abc import Iterable

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from rbee import __version__
from rbee.common.metrics import ScrapeCollector, gauge, new_registry
from rbee.hive.state import HiveState


class HiveMetrics:
    def __init__(self, state: HiveState) -> None:
        self._state = state
        # psutil measures CPU use between two calls: this first one starts the clock.
        psutil.cpu_percent(interval=None)
        self.registry: CollectorRegistry = new_registry()
        self.registry.register(ScrapeCollector(self.live))

    def live(self) -> Iterable[Metric]:
        state = self._state
        yield gauge(
            "rbee_hive_info",
            "Always 1; the labels say which hive this is",
            ["hive", "version"],
            [((state.settings.hive_id, __version__), 1)],
        )
        yield gauge(
            "rbee_hive_workers",
            "Worker processes this hive started that are running now",
            [],
            [((), len(state.supervisor.processes()))],
        )
        devices = state.devices.devices()
        yield gauge(
            "rbee_hive_device_memory_free_bytes",
            "Memory free on each device (RAM available for cpu:0)",
            ["device"],
            (((d.id,), d.memory_free_bytes) for d in devices),
        )
        yield gauge(
            "rbee_hive_device_memory_total_bytes",
            "Memory of each device",
            ["device"],
            (((d.id,), d.memory_total_bytes) for d in devices),
        )
        yield gauge(
            "rbee_hive_cpu_utilization",
            "Share of the machine's CPU time in use since the last scrape (0 to 1)",
            [],
            [((), psutil.cpu_percent(interval=None) / 100.0)],
        )
        progress = state.downloader.progress()
        yield gauge(
            "rbee_hive_downloads_active", "Model downloads under way", [], [((), len(progress))]
        )
        yield gauge(
            "rbee_hive_download_done_bytes",
            "Bytes of each model download received so far",
            ["model"],
            (((model,), done) for model, (done, _) in progress.items()),
        )
        yield gauge(
            "rbee_hive_download_size_bytes",
            "Announced size of each model download under way (absent when unknown)",
            ["model"],
            (((model,), size) for model, (_, size) in progress.items() if size is not None),
        )
