"""Split placement: a pure choice of several devices for one worker whose model fits on no one.

Used when `placement.place` refuses a model for want of memory. A split worker is one
`llama-server` on a main hive that holds part of the model on its own devices and the rest on
devices of helper hives, each reached through an RPC server (llama.cpp's RPC backend).

The estimate: the model's weights and its KV cache (for the requested context and slots) are
shared out over the devices, and each device also needs a compute buffer of its own and room for
one more layer (llama.cpp splits by whole layers, so a share is rounded to layers). A device's
room is its free memory (which, under a hive's `--memory-limit`, is already the limit less what
rbee's workers there hold) less what spawns still in flight will take.

The preference, in order:
1. the GPUs of one hive, as one process (`CUDA_VISIBLE_DEVICES` with several GPUs,
   `--tensor-split` in proportion to their room), as few as fit;
2. then devices on other hives over RPC, as few hives and devices as fit (the largest first);
   GPUs before CPUs: CPUs take part only when the GPUs cannot hold the model;
3. the device with the most room as the main one (its hive runs the worker, so it must have
   the model file; helpers only lend memory and receive the weights over the network).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from rbee.common.errors import InsufficientMemory, quote
from rbee.common.model_memory import MemoryEstimate, estimate_memory, gib
from rbee.contracts.hives import Device, HiveView
from rbee.contracts.workers import DEFAULT_CTX_SIZE
from rbee.queen.scheduler.placement import RETRY_AFTER_S, Demand, capacity

SPLIT_FLAG = "queen-rbee --split-across-hives"
SPLIT_SETTING = "split_across_hives"


def is_loopback_or_tls(url: str) -> bool:
    """A hive reached over TLS (https) or on this machine's loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_across_default(hives: Sequence[HiveView]) -> bool:
    """Splitting across hives is on by default only when every online hive talks over TLS or
    loopback: elsewhere a model's weights and activations would cross the LAN unencrypted."""
    return all(is_loopback_or_tls(h.url) for h in hives if h.online)


@dataclass(frozen=True)
class Part:
    """One device of a split worker and the bytes of the model it is given."""

    hive_id: str
    device: Device
    bytes: int


@dataclass(frozen=True)
class SplitPlan:
    """Where a split worker runs. `main`: the hive that runs its `llama-server`, `local` its
    devices there (the main device first), `remote` the devices lent by helper hives over RPC,
    grouped by hive in the order `--rpc` lists them."""

    main: HiveView
    local: tuple[Part, ...]
    remote: tuple[Part, ...]
    layers: int
    needed_bytes: int
    ctx_size: int = DEFAULT_CTX_SIZE
    slots: int = 1

    @property
    def parts(self) -> tuple[Part, ...]:
        return (*self.local, *self.remote)

    @property
    def helpers(self) -> tuple[str, ...]:
        """The helper hives, each once, in `--rpc` order."""
        return tuple(dict.fromkeys(p.hive_id for p in self.remote))

    def remote_of(self, hive_id: str) -> tuple[Part, ...]:
        return tuple(p for p in self.remote if p.hive_id == hive_id)

    @property
    def local_gpus(self) -> tuple[Part, ...]:
        return tuple(p for p in self.local if p.device.kind != "cpu")

    @property
    def device(self) -> str:
        """The main device, as a spawn request names it (`cuda:0`, `cpu:0`)."""
        return self.local[0].device.id

    def engine_devices(self) -> tuple[Part, ...]:
        """The parts in the order llama.cpp numbers its devices: RPC servers first (as `--rpc`
        lists them), then the local GPUs. A local CPU is not one of them: it holds the layers
        that are not offloaded (`--n-gpu-layers`)."""
        return (*self.remote, *self.local_gpus)

    def tensor_split(self) -> list[float]:
        """`--tensor-split`: each engine device's share, in proportion to its bytes."""
        shares = [p.bytes for p in self.engine_devices()]
        total = sum(shares) or 1
        return [round(share / total, 4) for share in shares]

    def gpu_layers(self) -> int:
        """`--n-gpu-layers`: all of them (-1) when the main hive runs on GPUs; with a local
        CPU, the layers the engine devices hold (the CPU keeps the first ones)."""
        if self.local_gpus:
            return -1
        total = sum(p.bytes for p in self.parts) or 1
        offloaded = sum(p.bytes for p in self.engine_devices())
        return max(1, min(self.layers - 1, round(self.layers * offloaded / total)))


@dataclass(frozen=True)
class _Room:
    hive: HiveView
    device: Device
    room: int  # free memory less reservations


# A device's room for its share of the weights and KV cache.
_Usable = Callable[[_Room], int]


def _rooms(
    hives: Sequence[HiveView], reserved: Mapping[tuple[str, str], int]
) -> dict[str, list[_Room]]:
    rooms: dict[str, list[_Room]] = {}
    for hive in hives:
        if not hive.online:
            continue
        usable = [
            _Room(hive, d, max(0, d.memory_free_bytes - reserved.get((hive.id, d.id), 0)))
            for d in hive.devices
            if d.problem is None and d.kind != "metal"  # Metal memory is the machine's own
        ]
        if usable:
            rooms[hive.id] = sorted(usable, key=lambda r: (r.device.kind == "cpu", -r.room))
    return rooms


def plan_split(
    hives: Sequence[HiveView],
    demand: Demand,
    reserved: Mapping[tuple[str, str], int] | None = None,
    *,
    across_hives: bool = True,
) -> SplitPlan:
    """The devices a worker for `demand` is split over, or `InsufficientMemory` (saying how to
    turn on splitting across hives when only that would fit and `across_hives` is off)."""
    reserved = reserved or {}
    rooms = _rooms(hives, reserved)
    mains = [h for h in hives if h.online and demand.model in h.models and h.id in rooms]
    footprint = next(
        (h.footprints[demand.model] for h in mains if demand.model in h.footprints), None
    )
    if footprint is None:
        raise InsufficientMemory(
            f"model {quote(demand.model)} fits on no single device, and no online hive that "
            "has it knows its size, so it cannot be split",
            needed_bytes=0,
            largest_free_bytes=max((r.room for rs in rooms.values() for r in rs), default=0),
        )
    estimate = estimate_memory(
        footprint,
        ctx_size=demand.ctx_size or DEFAULT_CTX_SIZE,
        slots=demand.slots or 1,
        kv_cache_setting=demand.kv_cache_type,
    )
    body = estimate.weights + estimate.kv_cache  # what is shared out
    per_device = estimate.compute + -(-body // footprint.layers)  # its compute + a layer's slack

    def usable(room: _Room) -> int:
        return max(0, room.room - per_device)

    # 1. The GPUs of one hive, as one process.
    best: tuple[tuple[int, ...], list[_Room]] | None = None
    for hive in mains:
        gpus = [r for r in rooms[hive.id] if r.device.kind == "cuda"]
        chosen = _fewest(gpus, body, usable)
        if chosen is not None and len(chosen) > 1:
            key = (len(chosen), -chosen[0].room)
            if best is None or key < best[0]:
                best = (key, chosen)
    if best is not None:
        return _plan(best[1][0].hive, best[1], [], body, footprint.layers, estimate, usable)

    # 2. Several hives: for each possible main hive, its own devices first, then the helpers
    #    with the most room, each with as few of its devices as fit.
    plans: list[tuple[tuple[int, int, int, str], SplitPlan]] = []
    for kinds in (("cuda",), ("cuda", "cpu")):
        for hive in mains:
            plan = _across(hive, rooms, kinds, body, usable, footprint.layers, estimate)
            if plan is not None:
                main_room = max(p.device.memory_free_bytes for p in plan.local)
                rank = (len(plan.helpers), len(plan.parts), -main_room, hive.id)
                plans.append((rank, plan))
        if plans:
            break
    if plans:
        plan = min(plans, key=lambda kp: kp[0])[1]
        if across_hives or not plan.remote:
            return plan
        raise InsufficientMemory(
            f"model {quote(demand.model)} needs {estimate.describe()}: it fits on no single "
            f"hive, but would split over hives {', '.join([plan.main.id, *plan.helpers])}; "
            f"splitting across hives is off on this cluster (its hives do not talk over TLS or "
            f"loopback): turn it on with `{SPLIT_FLAG}` or `{SPLIT_SETTING}: true` in the "
            "cluster file",
            needed_bytes=estimate.total,
            largest_free_bytes=_largest(rooms),
        )
    every = [r for rs in rooms.values() for r in rs]
    all_room = sum(usable(r) for r in every)
    could = sum(max(0, capacity(r.device) - per_device) for r in every) >= body
    raise InsufficientMemory(
        f"model {quote(demand.model)} needs {estimate.describe()} and fits on no device, nor "
        f"split over all {len(every)} devices of {len(rooms)} hive(s): together they have room "
        f"for {gib(all_room)} of its weights and KV cache, after a compute buffer of "
        f"{gib(per_device)} each",
        needed_bytes=estimate.total,
        largest_free_bytes=_largest(rooms),
        retry_after_s=RETRY_AFTER_S if could else None,
    )


def _largest(rooms: Mapping[str, Sequence[_Room]]) -> int:
    return max((r.room for rs in rooms.values() for r in rs), default=0)


def _fewest(candidates: Sequence[_Room], body: int, usable: _Usable) -> list[_Room] | None:
    """The fewest of `candidates` (largest first) whose usable room together holds `body`."""
    chosen: list[_Room] = []
    held = 0
    for room in sorted(candidates, key=lambda r: -usable(r)):
        if usable(room) <= 0:
            break
        chosen.append(room)
        held += usable(room)
        if held >= body:
            return chosen
    return None


def _across(
    main: HiveView,
    rooms: Mapping[str, Sequence[_Room]],
    kinds: tuple[str, ...],
    body: int,
    usable: _Usable,
    layers: int,
    needed: MemoryEstimate,
) -> SplitPlan | None:
    def pick(hive_id: str) -> list[_Room]:
        found = [r for r in rooms[hive_id] if r.device.kind in kinds and usable(r) > 0]
        if "cuda" in kinds and any(r.device.kind == "cuda" for r in found):
            # One process of a hive runs on its GPUs or on its CPU, not both.
            found = [r for r in found if r.device.kind == "cuda"]
        return found

    local_all = pick(main.id)
    if not local_all:
        return None
    local = _fewest(local_all, body, usable)
    if local is not None:
        return None  # fits on the main hive alone: case 1 (or a single device) covers it
    local = local_all
    left = body - sum(usable(r) for r in local)
    helpers = sorted(
        (h for h in rooms if h != main.id and pick(h)),
        key=lambda h: (-sum(usable(r) for r in pick(h)), h),
    )
    remote: list[_Room] = []
    for hive_id in helpers:
        candidates = pick(hive_id)
        # The last helper needed lends only as many of its devices as it must.
        fewest = _fewest(candidates, left, usable)
        if fewest is not None:
            remote.extend(fewest)
            return _plan(main, local, remote, body, layers, needed, usable)
        remote.extend(candidates)
        left -= sum(usable(r) for r in candidates)
    return None


def _plan(
    main: HiveView,
    local: Sequence[_Room],
    remote: Sequence[_Room],
    body: int,
    layers: int,
    needed: MemoryEstimate,
    usable: _Usable,
) -> SplitPlan:
    """Shares in proportion to each device's usable room, so every device is as full as the
    others; what rounding leaves goes to the main device."""
    rooms = [*local, *remote]
    total = sum(usable(r) for r in rooms)
    shares = [body * usable(r) // total for r in rooms]
    shares[0] += body - sum(shares)
    parts = [Part(r.hive.id, r.device, share) for r, share in zip(rooms, shares, strict=True)]
    return SplitPlan(
        main=main,
        local=tuple(parts[: len(local)]),
        remote=tuple(parts[len(local) :]),
        layers=layers,
        needed_bytes=needed.total,
        ctx_size=needed.ctx_size,
        slots=needed.slots,
    )
