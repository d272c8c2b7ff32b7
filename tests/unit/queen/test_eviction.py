"""Eviction for a model that fits nowhere: least recently used first, as few as needed, on the
device where that makes room; never a pinned worker, never a busy one unless draining."""

from __future__ import annotations

from rbee.contracts.hives import Device, HiveView, ModelFootprint
from rbee.queen.scheduler.eviction import Eviction, Resident, choose_eviction
from rbee.queen.scheduler.placement import Demand, estimate_for

GIB = 1 << 30
MODEL = "new.gguf"
# 1 GiB of weights and a small KV cache: a little over 1 GiB in all.
FOOTPRINT = ModelFootprint(
    weights_bytes=GIB, layers=16, kv_bytes_per_token=16 << 10, vocab_size=32000, head_count=16
)


def device(device_id: str = "cpu:0", free_gib: float = 0.0, limit_gib: float = 4.0) -> Device:
    return Device(
        id=device_id,
        kind="cpu" if device_id.startswith("cpu") else "cuda",
        name=device_id,
        memory_total_bytes=64 * GIB,
        memory_free_bytes=int(free_gib * GIB),
        memory_limit_bytes=int(limit_gib * GIB),
    )


def hive(hive_id: str, *devices: Device) -> HiveView:
    return HiveView(
        id=hive_id,
        url=f"http://{hive_id}:7835",
        version="0",
        devices=list(devices),
        models=[MODEL],
        footprints={MODEL: FOOTPRINT},
        online=True,
        last_seen_s=1.0,
        timestamp="2026-01-01T00:00:00Z",
    )


def needed() -> int:
    estimate = estimate_for(hive("h", device()), device(), DEMAND)
    assert estimate is not None
    return estimate.total


DEMAND = Demand(model=MODEL, ctx_size=2048)


def ids(choice: Eviction | None) -> tuple[str, ...] | None:
    return None if choice is None else choice.worker_ids


def resident(
    worker_id: str,
    gib: float = 1.5,
    last_used: float = 0.0,
    *,
    hive_id: str = "h",
    device_id: str = "cpu:0",
    pinned: bool = False,
    in_flight: int = 0,
    queued: int = 0,
) -> Resident:
    return Resident(
        worker_id,
        f"model-of-{worker_id}",
        hive_id,
        device_id,
        int(gib * GIB),
        pinned,
        in_flight,
        queued,
        last_used,
    )


def test_the_least_recently_used_idle_worker_goes_first() -> None:
    hives = [hive("h", device(free_gib=0.2))]
    residents = [resident("recent", last_used=50), resident("old", last_used=10)]
    choice = choose_eviction(hives, DEMAND, residents)
    assert choice is not None
    assert (choice.hive_id, choice.device_id, choice.worker_ids) == ("h", "cpu:0", ("old",))
    assert choice.needed_bytes == needed()
    assert choice.room_bytes >= needed()


def test_as_few_as_needed_in_lru_order() -> None:
    hives = [hive("h", device(free_gib=0.1))]
    # Three small workers: the two oldest together make room, the third stays.
    residents = [
        resident("a", gib=0.6, last_used=3),
        resident("b", gib=0.6, last_used=1),
        resident("c", gib=0.6, last_used=2),
    ]
    choice = choose_eviction(hives, DEMAND, residents)
    assert choice is not None
    assert choice.worker_ids == ("b", "c")


def test_the_device_needing_fewest_evictions_wins() -> None:
    hives = [hive("h1", device(free_gib=0.1)), hive("h2", device(free_gib=0.1))]
    residents = [
        # On h1 the oldest workers are small: two would have to go.
        resident("h1-small-1", gib=0.6, last_used=1, hive_id="h1"),
        resident("h1-small-2", gib=0.6, last_used=2, hive_id="h1"),
        # On h2 one worker, used more recently, makes room alone.
        resident("h2-big", gib=2.0, last_used=5, hive_id="h2"),
    ]
    choice = choose_eviction(hives, DEMAND, residents)
    assert choice is not None
    assert (choice.hive_id, choice.worker_ids) == ("h2", ("h2-big",))


def test_only_workers_on_the_device_that_makes_room_go() -> None:
    hives = [hive("h", device("cpu:0", free_gib=0.1), device("cuda:0", free_gib=0.1))]
    residents = [
        resident("cpu-old", last_used=1, device_id="cpu:0"),
        resident("gpu-newer", last_used=9, device_id="cuda:0"),
    ]
    choice = choose_eviction(hives, DEMAND, residents)
    assert choice is not None
    # One eviction either way: the GPU is preferred, and only its worker goes.
    assert (choice.device_id, choice.worker_ids) == ("cuda:0", ("gpu-newer",))


def test_pinned_workers_and_workers_with_a_queue_from_before_never_go() -> None:
    hives = [hive("h", device(free_gib=0.1))]
    residents = [
        resident("pinned", last_used=1, pinned=True),
        resident("queued-for", last_used=3, queued=2),
    ]
    assert choose_eviction(hives, DEMAND, residents) is None
    idle = resident("idle", last_used=99)
    choice = choose_eviction(hives, DEMAND, [*residents, idle])
    assert ids(choice) == ("idle",)


def test_a_worker_with_only_requests_in_flight_is_drained_after_the_idle_ones() -> None:
    hives = [hive("h", device(free_gib=0.1))]
    residents = [resident("generating", last_used=2, in_flight=1)]
    assert ids(choose_eviction(hives, DEMAND, residents)) == ("generating",)
    residents.append(resident("idle", last_used=50))
    assert ids(choose_eviction(hives, DEMAND, residents)) == ("idle",)
    # Requests that waited for its model before the asking model did keep it.
    residents = [resident("generating", last_used=2, in_flight=1, queued=1)]
    assert choose_eviction(hives, DEMAND, residents) is None


def test_draining_may_choose_a_busy_worker_but_never_a_pinned_one() -> None:
    hives = [hive("h", device(free_gib=0.1))]
    residents = [
        resident("pinned", last_used=1, pinned=True),
        resident("generating", last_used=2, in_flight=1, queued=3),
    ]
    choice = choose_eviction(hives, DEMAND, residents, drain=True)
    assert ids(choice) == ("generating",)
    # An idle worker goes before a busy one, even a more recently used one.
    residents.append(resident("idle", last_used=50))
    choice = choose_eviction(hives, DEMAND, residents, drain=True)
    assert ids(choice) == ("idle",)
    assert choose_eviction(hives, DEMAND, residents[:1], drain=True) is None


def test_room_already_coming_back_evicts_nothing_more() -> None:
    hives = [hive("h", device(free_gib=0.1))]
    residents = [resident("old", last_used=1)]
    freeing = {("h", "cpu:0"): int(1.5 * GIB)}  # a worker being evicted gives this back
    choice = choose_eviction(hives, DEMAND, residents, freeing=freeing)
    assert ids(choice) == ()
    # Starts in flight take room: then one more has to go.
    reserved = {("h", "cpu:0"): int(1.5 * GIB)}
    choice = choose_eviction(hives, DEMAND, residents, reserved, freeing)
    assert ids(choice) == ("old",)


def test_a_model_bigger_than_the_device_evicts_nothing() -> None:
    hives = [hive("h", device(free_gib=0.1, limit_gib=0.5))]
    assert choose_eviction(hives, DEMAND, [resident("old", gib=0.4)]) is None


def test_not_enough_to_evict_anywhere_is_none() -> None:
    hives = [hive("h", device(free_gib=0.1))]
    assert choose_eviction(hives, DEMAND, [resident("small", gib=0.2)]) is None


def test_a_model_keeps_its_min_replicas() -> None:
    hives = [hive("h", device(free_gib=0.1))]
    residents = [
        Resident("kept-1", "kept", "h", "cpu:0", int(1.5 * GIB), False, 0, 0, 1.0),
        Resident("kept-2", "kept", "h", "cpu:0", int(1.5 * GIB), False, 0, 0, 2.0),
        resident("other", last_used=9),
    ]
    floor = {"kept": 1}
    choice = choose_eviction(hives, DEMAND, residents, min_replicas=lambda m: floor.get(m, 0))
    assert ids(choice) == ("kept-1",), "one of kept's two may go, the least recently used"
    choice = choose_eviction(hives, DEMAND, residents[:1], min_replicas=lambda m: floor.get(m, 0))
    assert choice is None, "its last worker stays"
