"""Placement: a pure choice of hive and device for a new worker, over snapshots the hives reported.

The stages, in order: hives that are online and have the model → their devices (the one asked
for, if any) that can run workers → those with room for the model's estimated memory (free
memory less what spawns still in flight will take) → the best: a GPU before the CPU, then the
most free memory, then the hive id (so equal hives are chosen the same way every time).

A demand that leaves the context or the slots open gets, on each device, the model's own
default for the room there (`model_memory.default_sizing`); the placement carries the values
chosen, and the worker is started with exactly those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from rbee.common.errors import BadRequest, InsufficientMemory, NotFound, quote
from rbee.common.model_memory import MemoryEstimate, default_sizing, gib
from rbee.contracts.hives import Device, HiveView
from rbee.contracts.workers import DEFAULT_CTX_SIZE, KvCacheType

# When a model does not fit now but would on an emptier device: how soon to ask again (workers
# stop, or the memory their starts reserved is seen as really taken, within a few heartbeats).
RETRY_AFTER_S = 10


@dataclass(frozen=True)
class Placement:
    hive: HiveView
    device_id: str
    # None when the hive did not list the device: the hive itself then says why it cannot.
    device: Device | None = None
    estimate: MemoryEstimate | None = None
    # What to start the worker with: the demand's, or the defaults chosen for the device.
    ctx_size: int = DEFAULT_CTX_SIZE
    slots: int = 1


@dataclass(frozen=True)
class Demand:
    """What the new worker asks for; `device`/`hive_id` None: placement chooses; `ctx_size`/
    `slots` None: the model's default on the device chosen."""

    model: str
    ctx_size: int | None = None
    slots: int | None = None
    gpu_layers: int | None = None
    device: str | None = None
    hive_id: str | None = None
    kv_cache_type: KvCacheType = "auto"
    embedding: bool = False  # a worker for embeddings or reranking


def hives_with_model(hives: Sequence[HiveView], model: str) -> list[HiveView]:
    return [h for h in hives if h.online and model in h.models]


def estimate_for(
    hive: HiveView, device: Device, demand: Demand, room_bytes: int = 0
) -> MemoryEstimate | None:
    """The memory of the worker the demand would start on the device (what it leaves open
    chosen for `room_bytes`; with no room, the smallest default: what making room aims at).
    None when the hive could not read the model's header."""
    footprint = hive.footprints.get(demand.model)
    if footprint is None:
        return None
    return default_sizing(
        footprint,
        room_bytes,
        device_kind=device.kind,
        ctx_size=demand.ctx_size,
        slots=demand.slots,
        gpu_layers=demand.gpu_layers if device.kind != "cpu" else None,
        kv_cache_setting=demand.kv_cache_type,
        embedding=demand.embedding,
    )


def sized(placement: Placement, demand: Demand) -> Placement:
    """The placement with the context and slots to start the worker with: the estimate's, else
    (no estimate) the demand's, else the defaults of a model whose memory is unknown."""
    estimate = placement.estimate
    if estimate is not None:
        return replace(placement, ctx_size=estimate.ctx_size, slots=estimate.slots)
    return replace(placement, ctx_size=demand.ctx_size or DEFAULT_CTX_SIZE, slots=demand.slots or 1)


def place(
    hives: Sequence[HiveView],
    demand: Demand,
    reserved: Mapping[tuple[str, str], int] | None = None,
) -> Placement:
    """The hive and device for a new worker; NotFound, BadRequest or Unavailable (no room)."""
    reserved = reserved or {}
    candidates = [
        h
        for h in hives_with_model(hives, demand.model)
        if demand.hive_id is None or h.id == demand.hive_id
    ]
    if not candidates:
        where = (
            f"hive {quote(demand.hive_id)} does not have"
            if demand.hive_id
            else "no online hive has"
        )
        raise NotFound(
            f"{where} model {quote(demand.model)} in its catalog", code="model_not_found"
        )
    pairs = [(h, d) for h in candidates for d in h.devices if demand.device in (None, d.id)]
    if not pairs:
        if len(candidates) == 1 and demand.device is not None:
            # The hive knows why it lacks the device (no such GPU, no driver): let it answer.
            return sized(Placement(candidates[0], demand.device), demand)
        listed = "; ".join(f"{h.id}: {', '.join(d.id for d in h.devices)}" for h in candidates)
        raise BadRequest(
            f"no online hive with model {quote(demand.model)} has device {quote(demand.device)} ({listed})",
            code="no_such_device",
        )
    usable = [(h, d) for h, d in pairs if d.problem is None]
    if not usable:
        reasons = "; ".join(f"{d.id} of hive {h.id}: {d.problem}" for h, d in pairs)
        raise BadRequest(f"no worker can run on {reasons}", code="device_unusable")
    options = []
    for hive, device in usable:
        free = device.memory_free_bytes - reserved.get((hive.id, device.id), 0)
        estimate = estimate_for(hive, device, demand, free)
        options.append((hive, device, estimate, free))
    fitting = [o for o in options if o[2] is None or o[2].total <= o[3]]
    if not fitting:
        raise _no_room(demand, options)
    hive, device, estimate, _ = max(
        fitting, key=lambda o: (o[1].kind != "cpu", o[3], o[0].id, o[1].id)
    )
    return sized(Placement(hive, device.id, device, estimate), demand)


def capacity(device: Device) -> int:
    """The most rbee's workers could ever take on the device: all of it, or the hive's limit."""
    if device.memory_limit_bytes is None:
        return device.memory_total_bytes
    return min(device.memory_total_bytes, device.memory_limit_bytes)


def _no_room(
    demand: Demand, options: Sequence[tuple[HiveView, Device, MemoryEstimate | None, int]]
) -> InsufficientMemory:
    """The error for a model that fits on no device, with the numbers (only a known estimate
    can fail to fit). `Retry-After` only when memory freeing up would let it fit somewhere."""
    hive, device, estimate, free = max(options, key=lambda o: o[3])
    assert estimate is not None
    could_fit = any(e is not None and e.total <= capacity(d) for _, d, e, _ in options)
    if could_fit:
        message = (
            f"model {quote(demand.model)} needs {estimate.describe()} and fits on no device "
            f"now: the most free memory is {gib(max(free, 0))} on {device.id} of hive {hive.id}"
        )
    else:
        biggest = max(options, key=lambda o: capacity(o[1]))[1]
        message = (
            f"model {quote(demand.model)} needs {estimate.describe()}, more than any device "
            f"can hold even when empty (the largest, {biggest.id}, holds "
            f"{gib(capacity(biggest))} for rbee's workers)"
        )
    return InsufficientMemory(
        message,
        needed_bytes=estimate.total,
        largest_free_bytes=max(free, 0),
        retry_after_s=RETRY_AFTER_S if could_fit else None,
    )
