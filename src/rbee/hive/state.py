"""Everything one hive owns, built once by the app factory and reached through `app.state`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from rbee.common.jobs import Jobs
from rbee.hive.catalog import Catalog
from rbee.hive.devices import DeviceProbe
from rbee.hive.downloads import Downloader
from rbee.hive.footprints import FootprintCache
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


def get_state(request: Request) -> HiveState:
    state: HiveState = request.app.state.hive
    return state
