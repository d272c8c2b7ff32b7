"""Starting a split worker: helpers lend RPC servers first; a failed start gives them back."""

from __future__ import annotations

import pytest

from rbee.common.errors import Unavailable
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse
from rbee.contracts.hives import HiveView
from rbee.contracts.rpc import RpcServerInfo, RpcServerRequest
from rbee.contracts.workers import WorkerInfo, WorkerStatus
from rbee.queen.scheduler.placement import Demand
from rbee.queen.scheduler.split import plan_split
from rbee.queen.scheduler.split_start import start_split

from .test_split import cpu, hive

MODEL = "org/repo:model.gguf"


class Hives:
    def __init__(self) -> None:
        self.lent: list[tuple[str, RpcServerRequest]] = []
        self.returned: list[tuple[str, str]] = []
        self.spawned: list[tuple[str, SpawnRequest]] = []
        self.fail_spawn = False

    async def lend(self, h: HiveView, request: RpcServerRequest) -> RpcServerInfo:
        self.lent.append((h.id, request))
        return RpcServerInfo(
            rpc_id=f"{request.worker_id}@{h.id}",
            worker_id=request.worker_id,
            pid=1,
            host=f"198.18.0.{len(self.lent) + 2}",
            port=8100,
            devices=request.devices,
        )

    async def give_back(self, h: HiveView, rpc_id: str) -> None:
        self.returned.append((h.id, rpc_id))

    async def spawn(self, h: HiveView, request: SpawnRequest) -> SpawnResponse:
        if self.fail_spawn:
            raise Unavailable("the model did not load", code="worker_start_failed")
        self.spawned.append((h.id, request))
        assert request.worker_id is not None
        return SpawnResponse(worker_id=request.worker_id, pid=2, port=8080, url="http://x:8080")

    async def wait_ready(self, worker_id: str, timeout_s: float) -> WorkerInfo:
        return WorkerInfo(
            id=worker_id, model_id=MODEL, port=8080, status=WorkerStatus.READY, version="0"
        )


def views() -> dict[str, HiveView]:
    a = hive("a", cpu(3.0)).model_copy(update={"url": "http://198.18.0.2:7835"})
    return {"a": a, "b": hive("b", cpu(2.5), model=False)}


async def test_the_helper_lends_its_part_and_the_main_hive_runs_the_worker() -> None:
    hives, fake = views(), Hives()
    plan = plan_split(list(hives.values()), Demand(model=MODEL, ctx_size=2048, slots=1))
    _, info = await start_split(
        plan,
        MODEL,
        hives,
        lend=fake.lend,
        give_back=fake.give_back,
        spawn=fake.spawn,
        wait_ready=fake.wait_ready,
        load_timeout_s=60,
    )
    ((helper, lending),) = fake.lent
    assert helper == "b"
    assert lending.devices == ["cpu:0"]
    assert lending.bytes == plan.remote[0].bytes
    assert lending.allow_peer == "198.18.0.2"  # only the main worker's host may connect
    ((main, request),) = fake.spawned
    assert main == "a"
    assert request.rpc_tunnels == [f"rbee://198.18.0.3:8100/{info.id}@b"]
    assert [(p.hive_id, p.device) for p in request.parts] == [("a", "cpu:0"), ("b", "cpu:0")]
    assert request.gpu_layers == plan.gpu_layers()
    assert fake.returned == []


async def test_a_worker_that_does_not_start_gives_the_rpc_servers_back() -> None:
    hives, fake = views(), Hives()
    fake.fail_spawn = True
    plan = plan_split(list(hives.values()), Demand(model=MODEL, ctx_size=2048, slots=1))
    with pytest.raises(Unavailable):
        await start_split(
            plan,
            MODEL,
            hives,
            lend=fake.lend,
            give_back=fake.give_back,
            spawn=fake.spawn,
            wait_ready=fake.wait_ready,
            load_timeout_s=60,
        )
    assert [h for h, _ in fake.returned] == ["b"]
