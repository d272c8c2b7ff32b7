"""Everything one hive owns, built once by the app factory and reached through `app.state`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi import Request

from rbee.common.jobs import Jobs
from rbee.contracts.hive_api import WorkerProcess
from rbee.contracts.hives import Device
from rbee.hive.catalog import Catalog
from rbee.hive.devices import DeviceProbe, within_limit
from rbee.hive.downloads import Downloader
from rbee.hive.footprints import FootprintCache
from rbee.hive.proctable import ProcessTable
from rbee.hive.rpc import RpcServers
from rbee.hive.settings import HiveSettings
from rbee.hive.supervisor import Supervisor


@dataclass
class HiveState:
    settings: HiveSettings
    catalog: Catalog
    devices: DeviceProbe
    supervisor: Supervisor
    downloader: Downloader
    jobs: Jobs
    footprints: FootprintCache = field(default_factory=FootprintCache)
    # Set when what the queen should know changed (a model arrived or left, a worker started
    # and took memory): beat now.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    rpc_servers: RpcServers | None = None  # the devices it lends split workers (`rbee.hive.rpc`)

    def current_devices(
        self, running: Sequence[WorkerProcess] | None = None, table: ProcessTable | None = None
    ) -> list[Device]:
        """The devices with their free memory now, within `--memory-limit` if one is set: what
        the heartbeat and `/v1/capabilities` report (`running`: the hive's workers as just
        listed, else listed now; `table`: the look they were listed in). Blocks (reads /proc
        and the driver)."""
        devices = self.devices.devices()
        limit = self.settings.memory_limit
        if limit is None:
            return devices
        if running is None or table is None:
            table = ProcessTable.read()
            running = self.supervisor.processes(table)
        ram, pids = self.supervisor.memory_held(running, table)
        if self.rpc_servers is not None:  # what it lends split workers counts too
            lent, their = self.rpc_servers.memory_held(table)
            ram, pids = ram + lent, pids | their
        return within_limit(devices, limit, ram, self.devices.gpu_memory_of(pids))


def get_state(request: Request) -> HiveState:
    state: HiveState = request.app.state.hive
    return state
