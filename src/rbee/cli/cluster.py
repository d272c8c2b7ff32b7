"""`rbee up`'s machinery: a queen, hives (here or over SSH) and their workers, started in order
and stopped in reverse — workers first (through the queen, then any leftover: through a remote
hive's API, or by pid here), then the hives, then the queen. A hive starts workers in their own
session and forgets them, so we must stop them."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from rbee.cli import jobs, processes, remote_hive, state
from rbee.cli.context import ClientFactory, CliError
from rbee.cli.plan import HivePlan, UpPlan
from rbee.cli.ssh import Ssh, SshTarget
from rbee.clients.hive import HiveError
from rbee.clients.queen import QueenClient, QueenError
from rbee.common.cpus import usable_cpus
from rbee.common.worker_command import HIVE_EXECUTABLE, STANDBY_FLAG, runs, worker_command_flags
from rbee.contracts.jobs import WorkerSpawnJob, WorkerStopJob
from rbee.contracts.workers import WorkerView

LOCK = "up"  # the default cluster's state file (another cluster's: up-NAME)
WATCH_POLL_S = 0.5


def worker_processes(queen_url: str) -> list[psutil.Process]:
    """Worker processes on this machine that report to `queen_url`: ours to stop. A hive's
    standby is not one while its hive runs: the hive stops it, and the exited standby stays
    the hive's zombie until then. Its forks (the workers) and a standby whose hive is gone
    are."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        flags = worker_command_flags(cmdline)
        if flags is None or flags.get("--queen-url", "").rstrip("/") != queen_url:
            continue
        if STANDBY_FLAG in cmdline[1:4] and _child_of_a_hive(proc):
            continue
        found.append(proc)
    return found


def _child_of_a_hive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        parent = proc.parent()
        return parent is not None and runs(parent.cmdline(), HIVE_EXECUTABLE, "rbee.hive")
    return False


def lock_name(plan: UpPlan) -> str:
    """The state file of this cluster: `up` for the default one, `up-NAME` for another."""
    return state.cluster_prefix(plan.name)


def log_path(plan: UpPlan, daemon: str) -> Path:
    """The log of one of its daemons here: `queen` or `hive-ID`."""
    return state.log_path(f"{lock_name(plan)}-{daemon}")


def check_free(plan: UpPlan) -> None:
    """Refuse clearly when this cluster already runs, or when our ports here are taken."""
    running = state.load_running(state.pid_path(lock_name(plan)))
    if running is not None and running[0].pid != os.getpid():
        other = running[0]
        named = "" if plan.name == state.DEFAULT_CLUSTER else f" --name {plan.name}"
        raise CliError(
            f"rbee up{named} is already running (pid {other.pid}) with its OpenAI API at "
            f"{other.url}/v1 — stop it with `rbee{' --cluster ' + plan.name if named else ''} "
            f"down` or Ctrl-C in its terminal; another cluster beside it needs its own "
            "--name and --port"
        )
    local_hive_flag = "--hive-port" if plan.config is None else "a different hive port"
    ports = [(plan.queen_host, plan.port, "--port")]
    ports += [(h.listen_host, h.port, local_hive_flag) for h in plan.hives if h.ssh is None]
    for host, port, flag in ports:
        if processes.port_in_use(host, port):
            raise CliError(
                f"port {port} is already in use (is a queen or hive running? see "
                f"`rbee queen status` / `rbee hive status`) — choose another with {flag}"
            )


@dataclass
class Cluster:
    plan: UpPlan
    make_client: ClientFactory
    say: Callable[[str], None]
    queen: processes.Started | None = None
    local_hives: dict[str, processes.Started] = field(default_factory=dict)
    # Remote hives whose start script ran: stopped over SSH at the end, joined or not.
    remote_hives: dict[str, HivePlan] = field(default_factory=dict)
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
            "rbee up", me.pid, me.create_time(), self.plan.queen_url, log_path(self.plan, "queen")
        )
        children = [
            {"name": c.name, "pid": c.pid, "create_time": c.create_time}
            for c in (self.queen, *self.local_hives.values())
            if c is not None
        ]
        # Hives over SSH, so that a `rbee up` killed without a chance to clean can be cleaned
        # up after by the next one.
        remote = [
            {"ssh": h.ssh.spec, "port": h.port, "hive_id": h.hive_id, "url": h.url}
            for h in self.remote_hives.values()
            if h.ssh is not None
        ]
        state.save(
            state.pid_path(lock_name(self.plan)),
            lock,
            children=children,
            remote=remote,
            cluster=self.plan.name,
        )

    async def start(self) -> list[WorkerView]:
        """Queen, hives, workers, in that order. Call `check_free` first."""
        plan = self.plan
        state.save_token(lock_name(plan), plan.token)  # for the commands that talk to it
        self._record()
        queen_args = ["--host", plan.queen_host, "--port", str(plan.port), *plan.queen_args]
        self.queen = processes.spawn(
            "queen-rbee",
            [processes.find_program("queen-rbee"), *queen_args],
            url=plan.queen_url,
            log=log_path(plan, "queen"),
            env=self._env(),
        )
        self._record()
        await processes.wait_healthy(self.queen, plan.start_timeout_s)
        self.owns_queen_url = True
        self.say(f"queen is up at {plan.queen_url} (pid {self.queen.pid})")
        async with self.client() as client:
            await all_or_none(*(self._start_hive(client, hive) for hive in plan.hives))
            await all_or_none(*(self._start_workers(client, hive.hive_id) for hive in plan.hives))
            ready = await jobs.wait_until_ready(client, self.worker_ids, plan.ready_timeout_s)
        for view in ready:
            self.say(f"worker {view.id} is ready at {view.url} (hive {view.hive_id})")
        return ready

    async def _start_hive(self, client: QueenClient, hive: HivePlan) -> None:
        if hive.ssh is not None:
            await self._start_remote_hive(client, hive)
            return
        log = log_path(self.plan, f"hive-{hive.hive_id}")
        started = processes.spawn(
            "rbee-hive",
            [processes.find_program("rbee-hive"), *hive.local_args(self.plan.queen_url)],
            url=processes.url_for(hive.listen_host, hive.port),
            log=log,
            env=self._env(),
        )
        self.local_hives[hive.hive_id] = started
        self._record()
        await processes.wait_healthy(started, self.plan.start_timeout_s)
        await self._wait_hive_known(client, hive.hive_id, log)
        self.say(f"hive {hive.hive_id} is up at {hive.url} (pid {started.pid})")

    async def _start_remote_hive(self, client: QueenClient, hive: HivePlan) -> None:
        assert hive.ssh is not None
        remote = hive.remote(self.plan.queen_url_for_hives)
        ssh = Ssh(hive.ssh, isolated=True)
        self.say(f"starting hive {hive.hive_id} on {hive.ssh} over SSH…")
        self.remote_hives[hive.hive_id] = hive
        self._record()
        started = await remote_hive.start(ssh, remote, self.plan.queen_url, self.plan.token)
        await remote_hive.wait_joined(ssh, remote, client, started, self.plan.start_timeout_s)
        self.say(
            f"hive {hive.hive_id} is up on {hive.ssh} at {remote.url} (pid {started.pid}), "
            f"reporting to {started.queen_url}"
        )

    async def _start_workers(self, client: QueenClient, hive_id: str) -> None:
        workers = [w for w in self.plan.workers if w.hive_id == hive_id]
        local = any(h.hive_id == hive_id and h.ssh is None for h in self.plan.hives)
        for worker in workers:
            # A Hub file or URL not on the hive yet is downloaded first, with a progress bar.
            model = await jobs.pull_if_missing(client, worker.model, hive_id, Console(stderr=True))
            request = WorkerSpawnJob(
                operation="worker_spawn",
                model=model,
                hive_id=hive_id,
                device=worker.device,
                ctx_size=worker.ctx_size,
                slots=worker.slots,
                # A hive on this machine: its cores shared out evenly among the workers planned
                # for it (a remote hive takes its own even share of its free cores).
                cores=max(1, len(usable_cpus()) // len(workers)) if local else None,
            )
            # The job's own log lines would repeat what `say` reports.
            worker_id = await jobs.spawn_worker(client, request, None)
            self.worker_ids.append(worker_id)
            self.say(f"worker {worker_id} of {worker.model} started on hive {hive_id}")

    async def _wait_hive_known(self, client: QueenClient, hive_id: str, log: Path) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.plan.start_timeout_s
        while not any(h.id == hive_id and h.online for h in await client.hives()):
            if loop.time() >= deadline:
                raise CliError(f"hive {hive_id} never reported to the queen (log: {log})")
            await asyncio.sleep(processes.HEALTH_POLL_S)

    async def watch(self) -> str:
        """Returns (a reason) only when the queen or a hive here died under us."""
        while True:
            for daemon in (self.queen, *self.local_hives.values()):
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
        try:
            await self._stop_workers()
            await asyncio.gather(*(self._stop_remote_hive(h) for h in self.remote_hives.values()))
        finally:  # whatever went wrong with the workers, the daemons here still stop
            for daemon in (*self.local_hives.values(), self.queen):
                if daemon is not None and daemon.alive():
                    self.say(f"stopping {daemon.name} (pid {daemon.pid})…")
                    if not await processes.stop(daemon, self.grace_s):
                        self.say(f"{daemon.name} did not stop on SIGTERM: killed it")
            self._release()

    async def _stop_remote_hive(self, hive: HivePlan) -> None:
        """Workers the queen could not stop go through the hive's own API, then the hive goes."""
        assert hive.ssh is not None
        remote = hive.remote(self.plan.queen_url_for_hives)
        self.say(f"stopping hive {hive.hive_id} on {hive.ssh}…")
        try:
            with contextlib.suppress(HiveError):
                if leftover := await remote_hive.stop_workers(remote.url, self.plan.token):
                    self.say(f"stopped {len(leftover)} more worker(s) on {hive.ssh}")
            await remote_hive.stop(Ssh(hive.ssh, isolated=True), hive.port, self.grace_s)
        except (CliError, TimeoutError) as exc:
            self.say(f"could not stop hive {hive.hive_id} on {hive.ssh}: {exc or 'timeout'}")

    def _release(self) -> None:
        name = lock_name(self.plan)
        lock = state.load(state.pid_path(name))
        if lock is not None and lock[0].pid == os.getpid():
            state.pid_path(name).unlink(missing_ok=True)
            state.save_token(name, None)

    async def _stop_workers(self) -> None:
        if not self.owns_queen_url:
            return
        ids = set(self.worker_ids)
        ours = {h.hive_id for h in self.plan.hives}
        if self.queen is not None and self.queen.alive():
            async with self.client() as client:
                with contextlib.suppress(QueenError):
                    ids |= {w.id for w in await client.workers() if w.hive_id in ours}
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


async def all_or_none(*work: Coroutine[Any, Any, None]) -> None:
    """Run side by side; the first failure cancels the rest (and is raised), so nothing is still
    starting while `stop` runs."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def clean_stale_lock(token: str | None = None, name: str = state.DEFAULT_CLUSTER) -> list[str]:
    """Stop what a previous `rbee up` (of the cluster `name`) left behind when it was killed
    without a chance to clean: its daemons and workers here, and its hives over SSH with their
    workers."""
    path = state.pid_path(state.cluster_prefix(name))
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
    remote = found[1].get("remote")
    for hive in remote if isinstance(remote, list) else []:
        with contextlib.suppress(KeyError, TypeError, ValueError, CliError, TimeoutError):
            if asyncio.run(_stop_stale_remote(hive, token)):
                stopped.append(f"hive {hive['hive_id']} on {hive['ssh']}")
    path.unlink(missing_ok=True)
    state.save_token(path.stem, None)
    return stopped


async def _stop_stale_remote(hive: dict[str, object], token: str | None) -> bool:
    target = SshTarget.parse(str(hive["ssh"]))
    with contextlib.suppress(HiveError):
        await remote_hive.stop_workers(str(hive["url"]), token)
    outcome = await remote_hive.stop(Ssh(target, isolated=True), int(str(hive["port"])))
    return outcome != "not-running"
