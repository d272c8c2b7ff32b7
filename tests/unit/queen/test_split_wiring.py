"""The queen splits a model that fits on no single hive over several, on demand: helpers lend
RPC servers, the main hive runs the worker; a cluster that talks in clear over the LAN is told
how to turn splitting on; stopping a split worker gives the helpers' memory back."""

from __future__ import annotations

import asyncio

import pytest

from rbee.cli.clusterfile import parse
from rbee.clients.hive import HiveUnreachable
from rbee.common.errors import InsufficientMemory, Unavailable
from rbee.common.serve import parse_settings
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse
from rbee.contracts.hives import Device, HiveHeartbeat, HiveInfo, HiveView
from rbee.contracts.rpc import RpcServerInfo, RpcServerRequest
from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerPart, WorkerStatus
from rbee.queen.events import EventBus
from rbee.queen.hives import HiveRegistry
from rbee.queen.registry import WorkerRegistry
from rbee.queen.scheduler.placement import Demand
from rbee.queen.scheduler.spawner import Spawner
from rbee.queen.scheduler.split import SPLIT_FLAG, split_across_default
from rbee.queen.scheduler.split_start import Splitter, give_back_helpers
from rbee.queen.settings import QueenSettings
from rbee_testing.clock import FakeClock

from .test_split import FOOTPRINT, GIB, MODEL, cpu


class Cluster:
    """Two hives, each with a 3 GiB memory limit on its CPU: the 4.25 GiB model fits on neither
    alone, however many workers are evicted."""

    def __init__(self, host_a: str = "127.0.0.1", host_b: str = "127.0.0.2") -> None:
        clock = FakeClock()
        self.hives = HiveRegistry(90, clock)
        self.workers = WorkerRegistry(90, clock)
        self.lent: list[tuple[str, RpcServerRequest]] = []
        self.returned: list[tuple[str, str]] = []
        self.spawned: list[tuple[str, SpawnRequest]] = []
        for hive_id, host in (("a", host_a), ("b", host_b)):
            self.hives.update(
                HiveHeartbeat(
                    hive=HiveInfo(id=hive_id, url=f"http://{host}:7835", version="1"),
                    devices=[cpu(3.0, limit_gib=3.0)],
                    models=[MODEL],
                    footprints={MODEL: FOOTPRINT},
                    workers=[],
                )
            )
        self.spawner = Spawner(
            self.workers, self.hives, EventBus(), self.spawn, 30.0, stop=self.stop, clock=clock
        )
        self.splitter = Splitter(
            self.spawner, lend=self.lend, give_back=self.give_back, across=split_across_default
        )
        self.spawner.split = self.splitter.start

    async def lend(self, hive: HiveView, request: RpcServerRequest) -> RpcServerInfo:
        self.lent.append((hive.id, request))
        return RpcServerInfo(
            rpc_id=f"{request.worker_id}@{hive.id}",
            worker_id=request.worker_id,
            pid=7,
            host="127.0.0.2",
            port=8100,
            devices=request.devices,
            bytes=request.bytes,
        )

    async def give_back(self, hive: HiveView, key: str) -> None:
        self.returned.append((hive.id, key))

    async def spawn(self, hive: HiveView, request: SpawnRequest) -> SpawnResponse:
        assert request.worker_id is not None
        self.spawned.append((hive.id, request))
        info = WorkerInfo(
            id=request.worker_id,
            model_id=request.model,
            port=8080,
            status=WorkerStatus.READY,
            version="1",
            hive_id=hive.id,
            parts=request.parts,
        )
        self.workers.update_worker(WorkerHeartbeat(worker=info))
        return SpawnResponse(worker_id=request.worker_id, pid=42, port=8080, url="http://a:8080")

    async def stop(self, hive: HiveView, pid: int) -> None:
        pass


async def test_a_model_no_hive_fits_starts_split_over_two_hives_on_demand() -> None:
    cluster = Cluster()
    info = await cluster.spawner.ensure_worker(MODEL)
    (main, request), (helper, lending) = cluster.spawned[0], cluster.lent[0]
    assert {main, helper} == {"a", "b"}
    assert main != helper
    assert lending.worker_id == info.id
    assert request.rpc_tunnels == [f"rbee://127.0.0.2:8100/{info.id}@{helper}"]
    assert sorted(p.hive_id for p in info.parts) == ["a", "b"]
    assert len(request.tensor_split or []) == 1  # the one RPC device; the main CPU keeps the rest
    assert cluster.returned == []


async def test_a_cluster_talking_in_clear_over_the_lan_is_told_how_to_turn_splitting_on() -> None:
    cluster = Cluster("198.18.0.2", "198.18.0.3")
    with pytest.raises(InsufficientMemory) as refused:
        await cluster.spawner.ensure_worker(MODEL)
    assert SPLIT_FLAG in refused.value.message
    assert cluster.lent == []
    assert cluster.spawned == []


async def test_the_flag_turns_splitting_on_for_a_cluster_without_tls() -> None:
    cluster = Cluster("198.18.0.2", "198.18.0.3")
    settings = QueenSettings(split_across_hives=True)
    cluster.splitter.across = settings.split_across
    info = await cluster.spawner.ensure_worker(MODEL)
    assert len({p.hive_id for p in info.parts}) == 2


def test_splitting_is_on_by_default_only_over_tls_or_loopback() -> None:
    unset = QueenSettings()
    off = QueenSettings(split_across_hives=False)
    lan = Cluster("198.18.0.2", "198.18.0.3").hives.all()
    local = Cluster().hives.all()
    tls = [h.model_copy(update={"url": "https://198.18.0.2:7835"}) for h in lan]
    assert not unset.split_across(lan)
    assert unset.split_across(local)
    assert unset.split_across(tls)
    assert not off.split_across(local)


async def test_stopping_a_split_worker_stops_the_helpers_rpc_servers() -> None:
    cluster = Cluster()
    info = WorkerInfo(
        id="a-split-1",
        model_id=MODEL,
        port=8080,
        status=WorkerStatus.READY,
        version="1",
        hive_id="a",
        parts=[
            WorkerPart(hive_id="a", device="cpu:0", bytes=1),
            WorkerPart(hive_id="b", device="cpu:0", bytes=1),
        ],
    )
    stopped = await give_back_helpers(info, cluster.hives.get, cluster.give_back)
    assert stopped == ["a-split-1@b"]
    assert cluster.returned == [("b", "a-split-1@b")]


@pytest.mark.parametrize(("value", "on"), [("true", True), ("false", False)])
def test_the_cluster_files_split_across_hives_reaches_the_queen(value: str, on: bool) -> None:
    cluster = parse(
        f"[queen]\nsplit_across_hives = {value}\n\n[[hive]]\n",
        path="cluster.toml",
        local_hive_id="here",
    )
    settings = parse_settings(QueenSettings, "queen-rbee", cluster.queen.flags())
    lan = Cluster("198.18.0.2", "198.18.0.3").hives.all()
    local = Cluster().hives.all()
    assert settings.split_across(lan) is on
    assert settings.split_across(local) is on
    unset = parse("[[hive]]\n", path="cluster.toml", local_hive_id="here").queen.flags()
    assert "split-across-hives" not in " ".join(unset)


async def test_the_helpers_room_is_not_held_twice_once_the_split_worker_is_ready() -> None:
    cluster = Cluster()
    info = await cluster.spawner.ensure_worker(MODEL)
    (helper,) = {p.hive_id for p in info.parts} - {info.hive_id}
    taken = cluster.spawner.reservations.taken(cluster.hives.all())
    # The main hive's share stays promised until its heartbeat lists the worker; the helper's
    # is in its own figures (its RPC server's), so a later plan may use what it has left.
    assert (info.hive_id, "cpu:0") in taken
    assert (helper, "cpu:0") not in taken


async def test_a_split_waits_for_memory_a_hive_is_freeing_rather_than_refusing() -> None:
    cluster = Cluster()
    # Hive b still counts a worker that just died (its next heartbeat frees the memory).
    busy = cluster.hives.get("b")
    assert busy is not None
    held = busy.devices[0].model_copy(update={"memory_free_bytes": GIB // 2})

    def beat(device: Device) -> None:
        cluster.hives.update(
            HiveHeartbeat(
                hive=HiveInfo(id="b", url="http://127.0.0.2:7835", version="1"),
                devices=[device],
                models=[MODEL],
                footprints={MODEL: FOOTPRINT},
                workers=[],
            )
        )

    beat(held)
    with pytest.raises(InsufficientMemory):
        cluster.splitter.plan(Demand(model=MODEL))
    starting = asyncio.create_task(cluster.spawner.ensure_worker(MODEL))
    await asyncio.sleep(0.5)
    assert not starting.done()
    beat(cpu(3.0, limit_gib=3.0))
    info = await asyncio.wait_for(starting, 30)
    assert len({p.hive_id for p in info.parts}) == 2


def add_hive(cluster: Cluster, hive_id: str, host: str) -> None:
    cluster.hives.update(
        HiveHeartbeat(
            hive=HiveInfo(id=hive_id, url=f"http://{host}:7835", version="1"),
            devices=[cpu(3.0, limit_gib=3.0)],
            models=[MODEL],
            footprints={MODEL: FOOTPRINT},
            workers=[],
        )
    )


def cut_off(cluster: Cluster, hive_id: str) -> None:
    """The hive is still listed online, but lending it an RPC server fails (its cable is cut)."""
    lend = cluster.lend

    async def unreachable(hive: HiveView, request: RpcServerRequest) -> RpcServerInfo:
        if hive.id == hive_id:
            raise HiveUnreachable(hive.url, "ConnectTimeout")
        return await lend(hive, request)

    cluster.splitter.lend = unreachable


async def test_a_helper_out_of_reach_is_left_out_and_the_split_goes_elsewhere() -> None:
    cluster = Cluster()
    add_hive(cluster, "c", "127.0.0.3")
    plan = cluster.splitter.plan(Demand(model=MODEL))
    (helper,) = plan.helpers
    cut_off(cluster, helper)
    info = await cluster.spawner.ensure_worker(MODEL)
    assert helper not in {p.hive_id for p in info.parts}
    assert len({p.hive_id for p in info.parts}) == 2
    assert cluster.spawner.backoff.holds(MODEL) == []  # the main hive did nothing wrong


async def test_with_the_only_helper_out_of_reach_the_model_is_refused_for_memory() -> None:
    cluster = Cluster()
    (helper,) = cluster.splitter.plan(Demand(model=MODEL)).helpers
    cut_off(cluster, helper)
    with pytest.raises(InsufficientMemory) as refused:
        await cluster.spawner.ensure_worker(MODEL)
    assert refused.value.needed_bytes > refused.value.largest_free_bytes > 0
    assert cluster.spawned == []


async def test_a_split_worker_that_dies_soon_after_ready_counts_in_the_start_backoff() -> None:
    cluster = Cluster()
    for _ in range(2):
        info = await cluster.spawner.ensure_worker(MODEL)
        cluster.workers.remove_worker(info.id)
        cluster.spawner.worker_lost(info.id, "stopped heartbeating")
    (hold,) = cluster.spawner.backoff.holds(MODEL)
    assert hold.hive_id == info.hive_id
    assert hold.failures == 2
    assert "died" in hold.reason
    # While the main hive is on hold no split fits without it: the refusal says so, and when.
    with pytest.raises(Unavailable) as held:
        await cluster.spawner.ensure_worker(MODEL)
    assert "on hold" in held.value.message
    assert held.value.headers is not None
    assert "Retry-After" in held.value.headers
