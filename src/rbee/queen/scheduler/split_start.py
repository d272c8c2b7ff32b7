"""Starting a split worker from a `SplitPlan`: the helpers' RPC servers first, then the worker.

1. Each helper hive is asked to start an RPC server with the devices and memory the plan gives
   it (`POST /v1/rpc-servers`); it answers with the endpoint of the tunnel in front of it, which
   admits the cluster token only, and only from the main hive's address when that is an IP.
2. The main hive spawns the worker with those endpoints (`--rpc-tunnels`), the shares
   (`--tensor-split`) and the parts its heartbeats will carry.
3. If anything fails on the way, the RPC servers already started are stopped again.

`Splitter` is the queen's hook for it (`Spawner.split`): a model that fits on no single device is
planned (`plan_split`) and started here. When the queen stops a split worker (stopped, evicted,
unloaded) it stops the helpers' RPC servers too (`give_back_helpers`); when the worker dies they
stop by themselves once its connections to them end, so no list of them is kept here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from rbee.common.errors import InsufficientMemory, RbeeError, Unavailable
from rbee.contracts.hive_api import SpawnRequest, SpawnResponse
from rbee.contracts.hives import HiveView
from rbee.contracts.rpc import RpcServerInfo, RpcServerRequest
from rbee.contracts.workers import DEFAULT_CTX_SIZE, WorkerInfo, WorkerPart, keep_alive_wire
from rbee.queen.scheduler.placement import Demand
from rbee.queen.scheduler.spawner import Spawner, hold_message, load_deadline_s
from rbee.queen.scheduler.split import SplitPlan, plan_split

log = logging.getLogger("rbee.queen.split")
SPLIT_POLL_S = 0.25  # how often a split waiting for memory looks at the hives' figures again

# Asks a helper hive for an RPC server; stops one again (by its id).
LendFn = Callable[[HiveView, RpcServerRequest], Awaitable[RpcServerInfo]]
ReturnFn = Callable[[HiveView, str], Awaitable[object]]
SpawnFn = Callable[[HiveView, SpawnRequest], Awaitable[SpawnResponse]]
WaitFn = Callable[[str, float], Awaitable[WorkerInfo]]


class HelperFailed(Unavailable):
    """A helper hive did not lend its RPC server (out of reach, or it refused): the split is
    planned again without it."""

    code = "hive_unavailable"

    def __init__(self, hive_id: str, reason: str) -> None:
        super().__init__(f"hive {hive_id} could not lend an RPC server: {reason}")
        self.hive_id = hive_id


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
    stop: Callable[[int], Awaitable[object]] | None = None,
    **fields: object,
) -> tuple[SpawnResponse, WorkerInfo]:
    """Start the worker of a split plan; `fields`: more of the spawn request (keep-alive…).
    `stop`: stops the worker (by pid) when it was spawned but did not report ready."""
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
            try:
                lent.append((hive, await lend(hive, lending)))
            except Exception as exc:  # out of reach (a cut cable), or it said no
                raise HelperFailed(hive_id, str(exc) or type(exc).__name__) from exc
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
        try:
            return spawned, await wait_ready(spawned.worker_id, load_timeout_s)
        except BaseException:
            if stop is not None:
                with contextlib.suppress(Exception):
                    await stop(spawned.pid)
            raise
    except BaseException:
        for hive, info in lent:
            with contextlib.suppress(Exception):
                await give_back(hive, info.rpc_id)
        raise


# Whether splitting across hives is on, given the hives (the queen's setting, or the default).
AcrossFn = Callable[[Sequence[HiveView]], bool]


class Splitter:
    """The spawner's hook for a model that fits on no single device: plan a split worker and
    start it (the helpers' RPC servers, then the worker on the main hive)."""

    def __init__(
        self,
        spawner: Spawner,
        *,
        lend: LendFn,
        give_back: ReturnFn,
        across: AcrossFn,
        wait_s: float = 30.0,
    ) -> None:
        self.spawner = spawner
        self.lend = lend
        self.give_back = give_back
        self.across = across
        self.wait_s = wait_s  # longest a split waits for memory being freed (--queue-timeout)

    def plan(self, demand: Demand, exclude: frozenset[str] = frozenset()) -> SplitPlan:
        hives = self.spawner.hives.all()
        taken = self.spawner.reservations.taken(hives)
        usable = [h for h in hives if h.id not in exclude]
        return plan_split(usable, demand, taken, across_hives=self.across(hives))

    async def start(
        self,
        demand: Demand,
        exclude: frozenset[str],
        refused: InsufficientMemory,
        reason: str,
        keep_alive_s: float | None = None,
    ) -> WorkerInfo | None:
        """A split worker for `demand`, ready; None when no split fits now but the model could
        fit on one device once room is made there (the spawner then makes room); raises the
        split's refusal when neither can be (it says how much is missing, or how to turn on
        splitting across hives). `keep_alive_s`: for a start that is not on demand (a load by
        hand), how long it may stay idle (None: pinned); on demand, the model's keep-alive.

        A helper that cannot lend its RPC server (its cable was cut and the queen still lists
        it online, or it refused) is left out and the split planned again without it: the
        request is served by another placement, or refused for want of memory."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            try:
                plan = self.plan(demand, exclude)
            except InsufficientMemory as no_split:
                if refused.retry_after_s is not None:
                    return None
                # Memory that is being freed (a worker that just stopped or died, whose hive
                # has not reported it yet) is waited for; memory no one can free is not.
                if no_split.retry_after_s is None or loop.time() >= deadline:
                    self._raise_if_held(demand, exclude)
                    raise no_split from None
                await asyncio.sleep(SPLIT_POLL_S)
                continue
            try:
                return await self.start_plan(
                    plan, demand.model, reason=reason, keep_alive_s=keep_alive_s
                )
            except HelperFailed as failed:
                log.warning("%s; planning %s without it", failed.message, demand.model)
                exclude = exclude | {failed.hive_id}

    def _raise_if_held(self, demand: Demand, exclude: frozenset[str]) -> None:
        """No split fits without the hives on hold for this model (a split worker there failed
        to start or died early): say so and when it ends, as for any start on hold."""
        backoff = self.spawner.backoff
        held = backoff.held_hives(demand.model) & exclude
        if not held:
            return
        try:
            self.plan(demand, exclude - held)
        except InsufficientMemory:
            return  # it would not fit with them either
        holds = [h for h in backoff.holds(demand.model) if h.hive_id in held]
        remaining = backoff.remaining_s(holds[0])
        raise Unavailable(
            hold_message(demand.model, holds, remaining),
            code="no_worker",
            headers={"Retry-After": str(max(1, round(remaining)))},
        )

    async def start_plan(
        self, plan: SplitPlan, model: str, *, reason: str, keep_alive_s: float | None = None
    ) -> WorkerInfo:
        spawner = self.spawner
        if reason == "demand":
            keep_alive_s = keep_alive_wire(spawner.keep_alive(model))
        deadline_s = load_deadline_s(
            spawner.timeout_s, spawner.timeout_per_gib_s, plan.needed_bytes
        )
        held = [spawner.reservations.hold(p.hive_id, p.device.id, p.bytes) for p in plan.parts]
        loop = asyncio.get_running_loop()
        began = loop.time()
        spawner.loading[model] += 1
        try:
            spawned, ready = await start_split(
                plan,
                model,
                {h.id: h for h in spawner.hives.all()},
                lend=self.lend,
                give_back=self.give_back,
                spawn=spawner.spawn,
                wait_ready=spawner.wait_ready,
                stop=lambda pid: spawner.stop(plan.main, pid),
                load_timeout_s=deadline_s,
                keep_alive_s=keep_alive_s,
            )
        except BaseException as exc:
            for reservation in held:
                spawner.reservations.release(reservation)
            if isinstance(exc, RbeeError):
                spawner.on_result(
                    model, "timeout" if exc.code == "worker_start_timeout" else "failed"
                )
                if not isinstance(exc, HelperFailed):  # a helper's fault, not the main hive's
                    spawner.backoff.failed(
                        model, plan.main.id, f"split start failed: {exc.message}"
                    )
            raise
        finally:
            spawner.loading[model] -= 1
            if spawner.loading[model] <= 0:
                del spawner.loading[model]
        for reservation in held:
            if reservation.hive_id == plan.main.id:  # until its hive lists the worker
                spawner.reservations.started(reservation, spawned.worker_id)
            else:
                # A helper never lists the worker; it counts what its RPC server holds itself
                # (and heartbeats at once when it starts one).
                spawner.reservations.release(reservation)
        seconds = loop.time() - began
        spawner.on_result(model, "ready")
        spawner.on_loaded(model, reason, seconds)
        spawner.bus.publish(
            "model",
            {
                "change": "loaded",
                "model": model,
                "worker_id": spawned.worker_id,
                "hive_id": plan.main.id,
                "helpers": list(plan.helpers),
                "reason": reason,
                "load_s": round(seconds, 3),
                "keep_alive_s": keep_alive_s,
            },
        )
        return ready


async def give_back_helpers(
    info: WorkerInfo, hives: Callable[[str], HiveView | None], give_back: ReturnFn
) -> list[str]:
    """Stop the RPC servers helper hives lend a split worker (it was stopped, evicted or
    unloaded): their memory is free at once, not once they notice the worker is gone. Returns
    the RPC servers stopped; a helper that is offline or already stopped its own is skipped."""
    stopped = []
    for hive_id in dict.fromkeys(p.hive_id for p in info.parts if p.hive_id != info.hive_id):
        hive = hives(hive_id)
        if hive is None or not hive.online:
            continue
        key = f"{info.id}@{hive_id}"
        try:
            await give_back(hive, key)
        except Exception as exc:  # it stopped by itself already, or the hive is gone
            log.info("RPC server %s was not stopped: %s", key, exc)
        else:
            stopped.append(key)
    return stopped
