"""The hive heartbeat: who this hive is, its devices and its models, sent to the queen.

Sent at start, every interval, and right after the catalog changes or a worker was started
(so the free memory the queen places by is current). A queen that is down is
retried every interval without end; the hive keeps working meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from rbee import __version__
from rbee.contracts.hives import HiveHeartbeat, HiveInfo
from rbee.hive.state import HiveState

log = logging.getLogger("rbee.hive.heartbeat")


async def build_heartbeat(state: HiveState) -> HiveHeartbeat:
    # The workers first: the queen takes the memory of those listed as counted in `devices`.
    workers, running, table = await state.supervisor.started()
    # Both read the disk or the driver: keep them off the event loop. The memory the workers
    # (and RPC servers) hold is that of the same look at the processes (each reads all of /proc).
    devices, models = await asyncio.gather(
        asyncio.to_thread(state.current_devices, running, table),
        asyncio.to_thread(state.catalog.models),
    )
    footprints = await asyncio.to_thread(state.footprints.footprints, models)
    info = HiveInfo(id=state.settings.hive_id, url=state.settings.url, version=__version__)
    return HiveHeartbeat(
        hive=info,
        devices=devices,
        models=[m.id for m in models],
        footprints=footprints,
        workers=workers,
    )


async def send_heartbeat(state: HiveState, queen: httpx.AsyncClient) -> None:
    heartbeat = await build_heartbeat(state)
    response = await queen.post("/v1/hive-heartbeat", json=heartbeat.model_dump(mode="json"))
    response.raise_for_status()


async def heartbeat_loop(state: HiveState, queen: httpx.AsyncClient) -> None:
    reachable: bool | None = None
    while True:
        state.changed.clear()
        try:
            await send_heartbeat(state, queen)
        except httpx.HTTPError as exc:
            if reachable is not False:  # say it once per outage, not every interval
                log.warning("queen at %s not reachable: %s (retrying)", queen.base_url, exc)
            reachable = False
        except Exception:  # a bug here must not silence the hive for good
            log.exception("could not build or send the hive heartbeat (retrying)")
        else:
            if reachable is False:
                log.info("queen at %s reachable again", queen.base_url)
            reachable = True
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # arrives as the event is set (a spawn just ended), and the hive then never stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(state.settings.heartbeat_interval):
                await state.changed.wait()
