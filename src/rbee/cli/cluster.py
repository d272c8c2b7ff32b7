"""`rbee up`'s machinery: a queen, a local hive and its workers, started in order and stopped in
reverse — workers first (through the queen, then any leftover by pid), then the hive, then the
queen. The hive starts workers in their own session and forgets them, so we must stop them."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from rbee.cli import jobs, processes, state
from rbee.cli.context import ClientFactory, CliError
from rbee.clients.queen import QueenClient, QueenError
from rbee.contracts.jobs import WorkerSpawnJob, WorkerStopJob
from rbee.contracts.workers import WorkerView

LOCK = "up"
HIVE_HEARTBEAT_S = 2
WATCH_POLL_S = 0.5
WORKER_PROGRAM = "llm-worker-rbee"


@dataclass(frozen=True)
class UpPlan:
    model: str
    workers: int
    port: int
    hive_port: int
    hive_id: str
    token: str | None = None
    device: str | None = None
    models_dir: Path | None = None
    ready_timeout_s: float = 300.0
    start_timeout_s: float = 60.0

    @property
    def queen_url(self) -> str:
        return processes.url_for("127.0.0.1", self.port)

    @property
    def hive_url(self) -> str:
        return processes.url_for("127.0.0.1", self.hive_port)


def worker_processes(queen_url: str) -> list[psutil.Process]:
    """Worker processes on this machine that report to `queen_url`: ours to stop."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline: list[str] = proc.info.get("cmdline") or []
        is_worker = any(
            Path(arg).name == WORKER_PROGRAM or arg.startswith("rbee.worker") for arg in cmdline[:3]
        )
        if is_worker and _flag(cmdline, "--queen-url").rstrip("/") == queen_url:
            found.append(proc)
    return found


def _flag(cmdline: list[str], name: str) -> str:
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""


def check_free(plan: UpPlan) -> None:
    """Refuse clearly when another `rbee up` runs, or when our ports are taken."""
    running = state.load_running(state.pid_path(LOCK))
    if running is not None and running[0].pid != os.getpid():
        other = running[0]
        raise CliError(
            f"rbee up is already running (pid {other.pid}) with its OpenAI API at {other.url}/v1 "
            f"— stop it with Ctrl-C in its terminal or `kill {other.pid}`"
        )
    for port, flag in ((plan.port, "--port"), (plan.hive_port, "--hive-port")):
        if processes.port_in_use("127.0.0.1", port):
            raise CliError(
                f"port {port} is already in use (is a queen or hive running? see "
                f"`rbee queen status` / `rbee hive status`) — choose another with {flag}"
            )


@dataclass
class LocalCluster:
    plan: UpPlan
    make_client: ClientFactory
    say: Callable[[str], None]
    queen: processes.Started | None = None
    hive: processes.Started | None = None
    worker_ids: list[str] = field(default_factory=list)
    grace_s: float = 10.0
    # True once our queen answered: only then are the workers reporting to its URL ours.
    owns_queen_url: bool = False

    def client(self) -> QueenClient:
        return self.make_client(self.plan.queen_url, self.plan.token)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RBEE_TOKEN", None)
        if self.plan.token:
            env["RBEE_TOKEN"] = self.plan.token
        return env

    def _record(self) -> None:
        me = psutil.Process()
        lock = processes.Started(
            "rbee up", me.pid, me.create_time(), self.plan.queen_url, state.log_path("up-queen")
        )
        children = [
            {"name": c.name, "pid": c.pid, "create_time": c.create_time}
            for c in (self.queen, self.hive)
            if c is not None
        ]
        state.save(state.pid_path(LOCK), lock, children=children)

    async def start(self) -> list[WorkerView]:
        """Queen, hive, workers, in that order. Call `check_free` first."""
        plan = self.plan
        self._record()
        self.queen = processes.spawn(
            "queen-rbee",
            [processes.find_program("queen-rbee"), "--host", "127.0.0.1", "--port", str(plan.port)],
            url=plan.queen_url,
            log=state.log_path("up-queen"),
            env=self._env(),
        )
        self._record()
        await processes.wait_healthy(self.queen, plan.start_timeout_s)
        self.owns_queen_url = True
        self.say(f"queen is up at {plan.queen_url} (pid {self.queen.pid})")

        hive_args = [
            processes.find_program("rbee-hive"),
            *("--queen-url", plan.queen_url, "--host", "127.0.0.1"),
            *("--port", str(plan.hive_port), "--hive-id", plan.hive_id),
            *("--heartbeat-interval", str(HIVE_HEARTBEAT_S)),
        ]
        if plan.models_dir is not None:
            hive_args += ["--models-dir", str(plan.models_dir)]
        self.hive = processes.spawn(
            "rbee-hive",
            hive_args,
            url=plan.hive_url,
            log=state.log_path("up-hive"),
            env=self._env(),
        )
        self._record()
        await processes.wait_healthy(self.hive, plan.start_timeout_s)
        async with self.client() as client:
            await self._wait_hive_known(client)
            self.say(f"hive {plan.hive_id} is up at {plan.hive_url} (pid {self.hive.pid})")
            request = WorkerSpawnJob(
                operation="worker_spawn", model=plan.model, hive_id=plan.hive_id, device=plan.device
            )
            for _ in range(plan.workers):
                # The job's own log lines would repeat what `say` reports.
                worker_id = await jobs.spawn_worker(client, request, None)
                self.worker_ids.append(worker_id)
                self.say(f"worker {worker_id} started")
            ready = await jobs.wait_until_ready(client, self.worker_ids, plan.ready_timeout_s)
        for view in ready:
            self.say(f"worker {view.id} is ready at {view.url}")
        return ready

    async def _wait_hive_known(self, client: QueenClient) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.plan.start_timeout_s
        while not any(h.id == self.plan.hive_id and h.online for h in await client.hives()):
            if loop.time() >= deadline:
                raise CliError(
                    f"the hive never reported to the queen (log: {state.log_path('up-hive')})"
                )
            await asyncio.sleep(processes.HEALTH_POLL_S)

    async def watch(self) -> str:
        """Returns (a reason) only when the queen or the hive died under us."""
        while True:
            for daemon in (self.queen, self.hive):
                if daemon is not None and not daemon.alive():
                    tail = daemon.log_tail()
                    return f"{daemon.name} exited unexpectedly" + (f": {tail}" if tail else "")
            await asyncio.sleep(WATCH_POLL_S)

    def hurry(self) -> None:
        """A second Ctrl-C: stop waiting politely."""
        self.grace_s = 1.0

    async def stop(self) -> None:
        """Stop what this instance started, and nothing else: no queen of ours, no workers of ours."""
        if self.queen is None:
            self._release()
            return
        await self._stop_workers()
        for daemon in (self.hive, self.queen):
            if daemon is not None and daemon.alive():
                self.say(f"stopping {daemon.name} (pid {daemon.pid})…")
                if not await processes.stop(daemon, self.grace_s):
                    self.say(f"{daemon.name} did not stop on SIGTERM: killed it")
        self._release()

    def _release(self) -> None:
        lock = state.load(state.pid_path(LOCK))
        if lock is not None and lock[0].pid == os.getpid():
            state.pid_path(LOCK).unlink(missing_ok=True)

    async def _stop_workers(self) -> None:
        if not self.owns_queen_url:
            return
        ids = set(self.worker_ids)
        if self.queen is not None and self.queen.alive():
            async with self.client() as client:
                with contextlib.suppress(QueenError):
                    ids |= {w.id for w in await client.workers() if w.hive_id == self.plan.hive_id}
                if ids:
                    self.say(f"stopping {len(ids)} worker(s)…")
                await asyncio.gather(*(self._stop_worker(client, w) for w in sorted(ids)))
        leftovers = await asyncio.to_thread(worker_processes, self.plan.queen_url)
        if leftovers:
            self.say(f"stopping {len(leftovers)} worker process(es) directly…")
            await asyncio.gather(
                *(asyncio.to_thread(processes.terminate, p, self.grace_s) for p in leftovers)
            )

    async def _stop_worker(self, client: QueenClient, worker_id: str) -> None:
        request = WorkerStopJob(operation="worker_stop", worker_id=worker_id)
        try:
            await asyncio.wait_for(client.run_job(request), self.grace_s * 2)
        except (QueenError, TimeoutError) as exc:
            self.say(f"could not stop worker {worker_id} through the queen ({exc or 'timeout'})")


def clean_stale_lock() -> list[str]:
    """Stop what a previous `rbee up` left behind when it was killed without a chance to clean."""
    path = state.pid_path(LOCK)
    found = state.load(path)
    if found is None or found[0].alive():
        return []
    stopped = []
    children = found[1].get("children")
    for child in children if isinstance(children, list) else []:
        try:
            leftover = processes.Started(
                str(child["name"]), int(child["pid"]), float(child["create_time"]), "", Path()
            )
        except (KeyError, TypeError, ValueError):
            continue
        proc = leftover.process()
        if proc is not None:
            processes.terminate(proc, 10)
            stopped.append(f"{leftover.name} (pid {leftover.pid})")
    for proc in worker_processes(found[0].url):
        processes.terminate(proc, 10)
        stopped.append(f"worker (pid {proc.pid})")
    path.unlink(missing_ok=True)
    return stopped
