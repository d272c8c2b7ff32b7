"""Starting a split worker from a `SplitPlan`: the helpers' RPC servers first, then the worker.

1. Each helper hive is asked to start an RPC server with the devices and memory the plan gives
   it (`POST /v1/rpc-servers`); it answers with the endpoint of the tunnel in front of it, which
   admits the cluster token only, and only from the main hive's address when that is an IP.
2. The main hive spawns the worker with those endpoints (`--rpc-tunnels`), the shares
   (`--tensor-split`) and the parts its heartbeats will carry.
3. If anything fails on the way, the RPC servers already started are stopped again.

The RPC servers stop by themselves when the worker's connections to them end (it stopped, was
evicted or died), so no list of them is kept here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from rbee.common.errors import Unavailable
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse
from rbee.contracts.hives import HiveView
from rbee.contracts.rpc import RpcServerInfo, RpcServerRequest
from rbee.contracts.workers import DEFAULT_CTX_SIZE, WorkerInfo, WorkerPart
from rbee.queen.scheduler.split import SplitPlan

log = logging.getLogger("rbee.queen.split")

# Asks a helper hive for an RPC server; stops one again (by its id).
LendFn = Callable[[HiveView, RpcServerRequest], Awaitable[RpcServerInfo]]
ReturnFn = Callable[[HiveView, str], Awaitable[object]]
SpawnFn = Callable[[HiveView, SpawnRequest], Awaitable[SpawnResponse]]
WaitFn = Callable[[str, float], Awaitable[WorkerInfo]]


def main_address(plan: SplitPlan) -> str | None:
    """The address helpers allow: the main hive's, when its URL names an IP address."""
    host = (urlsplit(plan.main.url).hostname or "").strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def spawn_request(
    plan: SplitPlan, model: str, worker_id: str, lent: list[RpcServerInfo], **fields: object
) -> SpawnRequest:
    """The main hive's spawn request for the plan, its helpers' RPC servers in `--rpc` order."""
    return SpawnRequest.model_validate(
        {
            "model": model,
            "worker_id": worker_id,
            "device": plan.device,
            "ctx_size": plan.ctx_size or DEFAULT_CTX_SIZE,
            "slots": plan.slots,
            "gpu_layers": None if plan.local_gpus else plan.gpu_layers(),
            "rpc_tunnels": [info.endpoint for info in lent],
            "tensor_split": plan.tensor_split(),
            "parts": [
                WorkerPart(hive_id=p.hive_id, device=p.device.id, bytes=p.bytes) for p in plan.parts
            ],
            **fields,
        }
    )


async def start_split(
    plan: SplitPlan,
    model: str,
    hives: dict[str, HiveView],
    *,
    lend: LendFn,
    give_back: ReturnFn,
    spawn: SpawnFn,
    wait_ready: WaitFn,
    load_timeout_s: float,
    **fields: object,
) -> tuple[SpawnResponse, WorkerInfo]:
    """Start the worker of a split plan; `fields`: more of the spawn request (keep-alive…)."""
    worker_id = f"{plan.main.id}-split-{uuid.uuid4().hex[:8]}"
    allow = main_address(plan)
    lent: list[tuple[HiveView, RpcServerInfo]] = []
    try:
        for hive_id in plan.helpers:
            hive = hives.get(hive_id)
            if hive is None or not hive.online:
                raise Unavailable(f"hive {hive_id} went offline", code="hive_unavailable")
            parts = plan.remote_of(hive_id)
            lending = RpcServerRequest(
                worker_id=worker_id,
                devices=[p.device.id for p in parts],
                bytes=sum(p.bytes for p in parts),
                allow_peer=allow,
                connect_timeout_s=load_timeout_s,
            )
            lent.append((hive, await lend(hive, lending)))
        request = spawn_request(
            plan,
            model,
            worker_id,
            [info for _, info in lent],
            load_timeout_s=load_timeout_s,
            **fields,
        )
        log.info(
            "starting %s split over %s: tensor split %s",
            *(worker_id, ", ".join([plan.main.id, *plan.helpers]), request.tensor_split),
        )
        spawned = await spawn(plan.main, request)
        return spawned, await wait_ready(spawned.worker_id, load_timeout_s)
    except BaseException:
        for hive, info in lent:
            with contextlib.suppress(Exception):
                await give_back(hive, info.rpc_id)
        raise
