"""Eviction: a pure choice of the loaded workers to unload so that a model that fits nowhere
now gets room, over snapshots the hives and the router reported.

On each device that could hold the model at all (its capacity, under the hive's limit, is
at least the model's estimate), the workers that may go are taken least recently used first,
until the device's free memory (less what starts in flight will take, plus what workers being
evicted already give back) holds the model. The device that needs the fewest evictions wins;
then a GPU before the CPU, then the device whose evicted workers were used longest ago.

A pinned worker never goes. Nor does one whose model had requests waiting when the model
asking began to wait, or when the worker became ready (those it was loaded for): a loaded
model serves the queue it had first (no thrash), unless the
model asking has waited past the swap wait (`drain`). A worker with requests in flight but no
such queue may be chosen, after the idle ones: it takes no new request from then on and is
stopped once the requests in flight on it have ended, never cut off; requests for its model
that came later wait for their model's next turn, as the asking model waited for this one.
A model keeps its `min_replicas` loaded workers: only those above it may go.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rbee.contracts.hives import HiveView
from rbee.queen.scheduler.placement import Demand, capacity, estimate_for, hives_with_model
from rbee.queen.scheduler.reservations import DeviceKey


@dataclass(frozen=True, slots=True)
class Resident:
    """One loaded worker as eviction sees it."""

    worker_id: str
    model: str
    hive_id: str
    device_id: str
    bytes: int  # the memory it holds (its model's estimate)
    pinned: bool
    in_flight: int  # requests on it now
    # Requests waiting for its model that came before the model asking began to wait, or
    # before it was ready (those it was loaded for).
    queued: int
    last_used: float  # when a request on it last began or ended, queen's clock

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queued > 0


@dataclass(frozen=True, slots=True)
class Eviction:
    """Where the model goes once `worker_ids` are gone (none: room is already on its way, as
    workers being evicted give it back)."""

    hive_id: str
    device_id: str
    worker_ids: tuple[str, ...]
    needed_bytes: int
    room_bytes: int  # the device's room once they are gone


def choose_eviction(
    hives: Sequence[HiveView],
    demand: Demand,
    residents: Sequence[Resident],
    reserved: Mapping[DeviceKey, int] | None = None,
    freeing: Mapping[DeviceKey, int] | None = None,
    *,
    drain: bool = False,
    min_replicas: Callable[[str], int] = lambda model: 0,
) -> Eviction | None:
    """The workers to evict for `demand`, or None when no device can make room now."""
    reserved = reserved or {}
    freeing = freeing or {}
    loaded = Counter(r.model for r in residents)
    options: list[tuple[tuple[object, ...], Eviction]] = []
    for hive in hives_with_model(hives, demand.model):
        if demand.hive_id is not None and hive.id != demand.hive_id:
            continue
        for device in hive.devices:
            if device.problem is not None or demand.device not in (None, device.id):
                continue
            estimate = estimate_for(hive, device, demand)
            if estimate is None or estimate.total > capacity(device):
                continue  # unknown needs always fit; too big for it even when empty
            key = (hive.id, device.id)
            room = device.memory_free_bytes - reserved.get(key, 0) + freeing.get(key, 0)
            may_go = sorted(
                (
                    r
                    for r in residents
                    if (r.hive_id, r.device_id) == key
                    and not r.pinned
                    and r.bytes > 0
                    and (drain or r.queued == 0)
                ),
                key=lambda r: (r.busy, r.last_used, r.worker_id),
            )
            chosen: list[Resident] = []
            going: Counter[str] = Counter()
            for resident in may_go:
                if room >= estimate.total:
                    break
                if loaded[resident.model] - going[resident.model] <= min_replicas(resident.model):
                    continue  # its model keeps its min_replicas
                chosen.append(resident)
                going[resident.model] += 1
                room += resident.bytes
            if room < estimate.total:
                continue
            newest = max((r.last_used for r in chosen), default=float("-inf"))
            rank = (len(chosen), device.kind == "cpu", newest, -room, hive.id, device.id)
            ids = tuple(r.worker_id for r in chosen)
            options.append((rank, Eviction(hive.id, device.id, ids, estimate.total, room)))
    if not options:
        return None
    return min(options, key=lambda o: o[0])[1]
