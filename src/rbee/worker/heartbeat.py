"""Heartbeats straight to the queen: at once on every status change, otherwise every interval.

The queen may be down when the worker starts or go away later. The worker keeps serving and
keeps trying, backing off exponentially from a fraction of a second up to the interval — never
longer, so once the queen is back the worker is in its registry within one interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from rbee.common.tokens import auth_headers
from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo

log = logging.getLogger("rbee.worker.heartbeat")

HEARTBEAT_PATH = "/v1/worker-heartbeat"


# How long after a status change its heartbeat goes out.
STATUS_SETTLE_S = 0.01


class Heartbeater:
    def __init__(
        self,
        client: httpx.AsyncClient,
        queen_url: str,
        info: Callable[[], WorkerInfo],
        *,
        interval_s: float,
        token: str | None = None,
        first_retry_s: float = 0.25,
    ) -> None:
        self._client = client
        self._url = queen_url.rstrip("/") + HEARTBEAT_PATH
        self._info = info
        self.interval_s = interval_s
        self._headers = auth_headers(token)
        self._first_retry_s = min(first_retry_s, interval_s)
        self._wake = asyncio.Event()
        self.sent = 0
        self.failures = 0
        self.connected = False
        self._closing = False

    def notify(self) -> None:
        """The status changed: send now rather than at the next interval."""
        self._wake.set()

    async def send(self, info: WorkerInfo, timeout_s: float | None = None) -> bool:
        """One heartbeat. True if the queen accepted it; failures are logged, never raised."""
        body = WorkerHeartbeat(worker=info).model_dump(mode="json")
        try:
            response = await self._client.post(
                self._url, json=body, headers=self._headers, timeout=timeout_s
            )
        except httpx.HTTPError as exc:
            self._failed(f"queen unreachable at {self._url}: {exc.__class__.__name__}")
            return False
        if response.status_code >= 300:
            self._failed(f"queen refused the heartbeat: HTTP {response.status_code}")
            return False
        if not self.connected:
            log.info("heartbeat accepted by the queen (%s)", info.status.value)
        self.connected = True
        self.sent += 1
        return True

    def _failed(self, reason: str) -> None:
        # Say it once when the link drops, not on every retry.
        if self.connected or self.failures == 0:
            log.warning("%s; will keep trying", reason)
        self.connected = False
        self.failures += 1

    def close(self) -> None:
        """Ask `run` to send the current status once more and return.

        `run` is never cancelled mid-send at shutdown: a heartbeat still in flight could reach
        the queen after the final `stopped` one and put the worker back into its registry.
        """
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        retry_s = self._first_retry_s
        while True:
            self._wake.clear()
            if await self.send(self._info(), timeout_s=min(10.0, self.interval_s)):
                delay, retry_s = self.interval_s, self._first_retry_s
            else:
                delay, retry_s = retry_s, min(retry_s * 2, self.interval_s)
            if self._closing:
                return
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                continue
            if not self._closing:
                # A status change arrives as a request starts; sending a moment later keeps the
                # send out of that request's way (it cost ~2 ms of its first-token time) and
                # sends only the latest of several quick changes.
                await asyncio.sleep(STATUS_SETTLE_S)
