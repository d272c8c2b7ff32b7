"""The last hour of the cluster's figures, kept by the queen so the dashboard's charts survive a
page reload (and a page opened late still shows what happened).

One sample every `--history-interval` (10 s by default), whether anyone watches or not: the
rates of the `stats` event over that interval, the queue, and the memory each device of each
online hive has in use. Each worker's resident memory (its `llama-server` included) is read
from its hive at the same time. Samples older than an hour fall off; the buffer is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import httpx

from rbee.clients.hive import HiveError
from rbee.contracts.hives import HiveView
from rbee.queen.live import WORKER_SCRAPE_TIMEOUT_S, StatsSampler
from rbee.queen.state import QueenState

log = logging.getLogger("rbee.queen.history")
WINDOW_S = 3600.0  # how far back the charts go
MAX_SAMPLES = 3600  # the bound, whatever the interval


class History:
    """A bounded buffer of samples, oldest first, and the workers' last known memory."""

    def __init__(self, interval_s: float, window_s: float = WINDOW_S) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: deque[dict[str, Any]] = deque(
            maxlen=max(2, min(MAX_SAMPLES, int(window_s / interval_s) + 1))
        )
        self.worker_memory: dict[str, int] = {}

    def add(self, sample: dict[str, Any]) -> None:
        self.samples.append(sample)
        cutoff = sample["t"] - self.window_s
        while self.samples and self.samples[0]["t"] < cutoff:
            self.samples.popleft()

    def view(self) -> dict[str, Any]:
        """`GET /v1/dashboard/history`."""
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "samples": list(self.samples),
            "worker_memory_bytes": dict(self.worker_memory),
        }


def device_memory(state: QueenState) -> dict[str, int]:
    """Bytes in use on each device of each online hive (`HIVE/DEVICE`), by the hive's word."""
    used: dict[str, int] = {}
    for hive in state.hives.online():
        for device in hive.devices:
            used[f"{hive.id}/{device.id}"] = max(
                0, device.memory_total_bytes - device.memory_free_bytes
            )
    return used


async def worker_memory(state: QueenState) -> dict[str, int]:
    """Each worker's resident memory, as its hive sees the process (hives that do not answer
    in time leave their workers out)."""

    async def of(hive: HiveView) -> dict[str, int]:
        try:
            client = state.hive_clients.get(hive)
            listed = await asyncio.wait_for(client.workers(), WORKER_SCRAPE_TIMEOUT_S * 3)
        except (HiveError, httpx.HTTPError, OSError, TimeoutError) as exc:
            log.debug("no worker list from hive %s: %s", hive.id, exc)
            return {}
        return {w.worker_id: w.memory_bytes for w in listed}

    found: dict[str, int] = {}
    for part in await asyncio.gather(*(of(h) for h in state.hives.online())):
        found.update(part)
    return found


async def history_loop(state: QueenState, history: History) -> None:
    """Take a sample every interval, for as long as the queen runs."""
    async with httpx.AsyncClient(timeout=WORKER_SCRAPE_TIMEOUT_S) as http:
        sampler = StatsSampler(state, http)
        await sampler.sample()  # the baseline: rates need two readings
        while True:
            await asyncio.sleep(history.interval_s)
            stats = await sampler.sample()
            history.worker_memory = await worker_memory(state)
            history.add(
                {
                    "t": round(time.time(), 1),
                    "requests_per_s": stats["requests_per_s"],
                    "tokens_per_s": stats["tokens_per_s"],
                    "ttft_s": stats["ttft_s"],
                    "queue": stats["queue"],
                    "in_flight": stats["in_flight"],
                    "worker_tokens_per_s": stats["worker_tokens_per_s"],
                    "memory_bytes": device_memory(state),
                }
            )
