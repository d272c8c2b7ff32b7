"""Starting workers through a hive: memory promised to a new worker stays promised until the
hive's own figures show it, and a worker that does not come up in time is stopped."""

from __future__ import annotations

import pytest

from rbee.common.errors import Unavailable
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse
from rbee.contracts.hives import Device, HiveHeartbeat, HiveInfo, HiveView, ModelFootprint
from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.queen.events import EventBus
from rbee.queen.hives import HiveRegistry
from rbee.queen.registry import WorkerRegistry
from rbee.queen.scheduler.placement import Demand
from rbee.queen.scheduler.spawner import Spawner
from rbee_testing.clock import FakeClock

GIB = 1 << 30
MODEL = "org/repo:model.gguf"
# About 4.44 GiB at 2048 tokens of context: one fits in 6 GiB, two do not.
FOOTPRINT = ModelFootprint(
    weights_bytes=4 * GIB, layers=32, kv_bytes_per_token=128 << 10, vocab_size=32000, head_count=32
)


class FakeMachine:
    """A hive with one 6 GiB GPU and a big CPU. It starts workers that report ready at once;
    its heartbeats go out only when the test says so, as a real one's may come late."""

    def __init__(self, hives: HiveRegistry, workers: WorkerRegistry, *, ready: bool = True) -> None:
        self.hives = hives
        self.workers = workers
        self.ready = ready
        self.gpu_free = 6 * GIB
        self.started: list[tuple[str, str]] = []  # (worker id, device)
        self.stopped: list[int] = []

    def heartbeat(self, listing: list[str]) -> None:
        devices = [
            Device(
                id="cpu:0",
                kind="cpu",
                name="cpu",
                cores=8,
                memory_total_bytes=64 * GIB,
                memory_free_bytes=40 * GIB,
            ),
            Device(
                id="cuda:0",
                kind="cuda",
                name="NVIDIA RTX",
                memory_total_bytes=8 * GIB,
                memory_free_bytes=self.gpu_free,
            ),
        ]
        self.hives.update(
            HiveHeartbeat(
                hive=HiveInfo(id="box", url="http://box:7835", version="1"),
                devices=devices,
                models=[MODEL],
                footprints={MODEL: FOOTPRINT},
                workers=listing,
            )
        )

    async def spawn(self, hive: HiveView, request: SpawnRequest) -> SpawnResponse:
        worker_id = f"box-{8080 + len(self.started)}"
        self.started.append((worker_id, request.device))
        if self.ready:
            info = WorkerInfo(
                id=worker_id,
                model_id=request.model,
                port=8080,
                status=WorkerStatus.READY,
                version="1",
                hive_id=hive.id,
            )
            self.workers.update_worker(WorkerHeartbeat(worker=info))
        return SpawnResponse(worker_id=worker_id, pid=4242, port=8080, url="http://box:8080")

    async def stop(self, hive: HiveView, pid: int) -> None:
        self.stopped.append(pid)


def machine_and_spawner(
    *, ready: bool = True, timeout_s: float = 30.0
) -> tuple[FakeMachine, Spawner]:
    clock = FakeClock()
    hives = HiveRegistry(90, clock)
    workers = WorkerRegistry(90, clock)
    machine = FakeMachine(hives, workers, ready=ready)
    spawner = Spawner(
        workers, hives, EventBus(), machine.spawn, timeout_s, stop=machine.stop, clock=clock
    )
    machine.heartbeat([])
    return machine, spawner


async def start_one(spawner: Spawner) -> str:
    demand = Demand(model=MODEL, ctx_size=2048)
    placement = spawner.place(demand)
    await spawner.start(placement, demand)
    return placement.device_id


async def test_two_starts_before_the_hives_next_heartbeat_do_not_share_room_for_one() -> None:
    _, spawner = machine_and_spawner()
    assert await start_one(spawner) == "cuda:0"
    # The hive has not heartbeat since: its figures still show 6 GiB free on the GPU.
    assert await start_one(spawner) == "cpu:0"


async def test_the_room_stays_taken_until_a_heartbeat_lists_the_new_worker() -> None:
    machine, spawner = machine_and_spawner()
    assert await start_one(spawner) == "cuda:0"
    # A heartbeat read before the worker had started: its figures do not show the worker yet.
    machine.heartbeat([])
    assert await start_one(spawner) == "cpu:0"
    # The hive lists the worker: its figures hold its memory now, the promise is over.
    machine.gpu_free = int(1.5 * GIB)
    machine.heartbeat(["box-8080", "box-8081"])
    assert spawner.reservations.taken(spawner.hives.all()) == {}
    assert await start_one(spawner) == "cpu:0"
    # The GPU worker stopped, and the hive says so: its room is free for the next one.
    machine.gpu_free = 6 * GIB
    machine.heartbeat(["box-8081", "box-8082"])
    assert await start_one(spawner) == "cuda:0"


async def test_a_worker_that_does_not_report_ready_in_time_is_stopped() -> None:
    machine, spawner = machine_and_spawner(ready=False, timeout_s=0.2)
    demand = Demand(model=MODEL, ctx_size=2048)
    with pytest.raises(Unavailable) as failed:
        await spawner.start(spawner.place(demand), demand)
    assert failed.value.code == "worker_start_timeout"
    assert machine.stopped == [4242]
    # Its room was given back: the next start may use the GPU again.
    assert spawner.place(demand).device_id == "cuda:0"
