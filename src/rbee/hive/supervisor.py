"""Starting, finding and stopping worker processes — with no list of them kept anywhere.

A worker started by this hive carries two marks the operating system keeps for us: its
command line (`llm-worker-rbee … --hive-id ID --worker-id W --port P`) and an environment
variable (`RBEE_SPAWNED_BY_HIVE=ID`). Listing and stopping read those marks through psutil,
so a restarted hive sees exactly what the old one started, and can never be talked into
signalling a process that is not one of its workers.

Workers run in their own session: a SIGINT/SIGKILL to the hive's process group leaves them
serving. The only in-memory state is `Popen` handles kept so that workers which exit while
this hive runs are reaped instead of lingering as zombies; they are never consulted as a list.

A worker is usually a fork of the hive's standby (`rbee.hive.standby`), which reaps it: its
command line then says `--standby --hive-id ID`, and its flags are read from a file named after
its pid and start time, only for such a process carrying the hive's mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import httpx
import psutil

from rbee.common.children import ended
from rbee.common.clock import Clock, monotonic
from rbee.common.cpus import format_cpu_set, parse_cpu_set, usable_cpus
from rbee.common.errors import BadRequest, Conflict, NotFound, RbeeError, Unavailable, quote
from rbee.common.gpu import device_environment, parse_device
from rbee.common.worker_command import SPAWN_MARKER as SPAWN_MARKER  # rpc.py's too
from rbee.common.worker_command import WORKER_EXECUTABLE, worker_command_flags
from rbee.contracts.hive_api import (
    CatalogModel,
    SpawnRequest,
    SpawnResponse,
    WorkerProcess,
    WorkerStopped,
)
from rbee.contracts.workers import WORKER_ID_PATTERN, http_url
from rbee.hive.catalog import Catalog
from rbee.hive.cores import CorePlacement, place_cores
from rbee.hive.ports import pick_port
from rbee.hive.proctable import ProcessTable, resident
from rbee.hive.settings import HiveSettings
from rbee.hive.standby import EXIT_UNKNOWN, Forked, Standby, standby_flags
from rbee.hive.worker_launch import split_flags, worker_env
from rbee.hive.worker_logs import last_lines, output_tail, rotate_log

log = logging.getLogger("rbee.hive.supervisor")
# How often a starting worker's /health is asked until it answers (it listens within moments of
# its start; a swap waits for this answer); once it does, it holds its answer up to
# HEALTH_WAIT_S until its model is loaded.
READY_POLL_S = 0.02
HEALTH_WAIT_S = 5.0


class WorkerStartFailed(RbeeError):
    status_code = 500
    type = "server_error"
    code = "worker_start_failed"


def worker_flags(cmdline: Sequence[str], hive_id: str) -> dict[str, str] | None:
    """The flags of a worker command line of this hive, or None for any other process."""
    flags = worker_command_flags(cmdline)
    if flags is None or flags.get("--hive-id") != hive_id or not flags.get("--worker-id"):
        return None
    if not flags.get("--port", "").isdigit():
        return None
    return flags


async def exited(proc: psutil.Process, timeout_s: float) -> int | None:
    """Wait for the process to end, and its exit code (None: not a child of ours). Told by the
    kernel at once where it can (a pidfd), not at the next look of a polling wait: a swap waits
    for the old worker's end. Raises psutil.TimeoutExpired."""
    try:
        await asyncio.wait_for(ended(proc.pid), timeout_s)
    except TimeoutError:
        raise psutil.TimeoutExpired(timeout_s, proc.pid) from None
    # It has ended, its memory freed. Ours: reaped here, with its code. Another's (a fork of the
    # standby): its parent reaps it, and psutil's wait would poll until it had.
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if pid else None


class Supervisor:
    def __init__(
        self,
        settings: HiveSettings,
        catalog: Catalog,
        http: httpx.AsyncClient,
        *,
        clock: Clock = monotonic,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self._http = http
        self._clock = clock
        self._lock = asyncio.Lock()
        self._reserved: set[int] = set()  # ports of spawns still starting up
        self._reserved_cores: dict[int, tuple[int, ...]] = {}  # their cores, by port
        self._machine = usable_cpus()
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # for reaping only
        self.standby = Standby(
            [
                settings.worker_command,
                *("--standby", "--hive-id", settings.hive_id, "--queen-url", settings.queen_url),
            ],
            worker_env(os.environ, settings.hive_id, settings.token),
            flags_dir=settings.log_dir / "standby",
            output=settings.log_dir / "standby.log",
            enabled=settings.standby,
        )

    # -- finding -------------------------------------------------------------------------

    def processes(self, table: ProcessTable | None = None) -> list[WorkerProcess]:
        """The workers of this hive, as the operating system reports them right now (or as
        `table`, a look just taken, does)."""
        self.reap()
        table = table or ProcessTable.read()
        found = []
        for proc in table.processes:
            if (worker := self._inspect(proc, proc.info.get("cmdline"), table)) is not None:
                found.append(worker)
        return sorted(found, key=lambda w: w.port)

    async def started(self) -> tuple[list[str], list[WorkerProcess], ProcessTable]:
        """Ids of the workers past start-up, and every worker process (starting ones too), from
        one look, and that look. Read before the devices are, the memory they take is in the
        devices' figures (a worker counts as started once it answers `/health`)."""
        before = set(self._reserved)
        table = await asyncio.to_thread(ProcessTable.read)
        running = await asyncio.to_thread(self.processes, table)
        starting = before | self._reserved  # and those that began while the list was read
        return sorted(w.worker_id for w in running if w.port not in starting), running, table

    def memory_held(
        self, running: Sequence[WorkerProcess] | None = None, table: ProcessTable | None = None
    ) -> tuple[int, frozenset[int]]:
        """The RAM this hive's workers hold (resident memory, their engines included), and the
        pids of all their processes (for what they hold on GPUs). `running` and `table`: the
        workers as just listed and the look they were listed in (default: a look now)."""
        if running is None or table is None:
            table = ProcessTable.read()
            running = self.processes(table)
        ram, pids = 0, set()
        for worker in running:
            ram += worker.memory_bytes
            pids.add(worker.pid)
            pids.update(child.pid for child in table.descendants(worker.pid))
        return ram, frozenset(pids)

    def _flags(self, proc: psutil.Process, cmdline: list[str]) -> dict[str, str] | None:
        """The flags of a worker of this hive: on its command line, or those handed to it as a
        standby (its command line a standby's of this hive; its mark is checked next)."""
        hive_id = self.settings.hive_id
        flags = worker_flags(cmdline, hive_id)
        if flags is None and standby_flags(cmdline, hive_id):
            handed = self.standby.handed_argv(proc)
            if handed is not None:
                flags = worker_flags([WORKER_EXECUTABLE, *handed], hive_id)
        return flags

    def _inspect(
        self,
        proc: psutil.Process,
        cmdline: list[str] | None = None,
        table: ProcessTable | None = None,
    ) -> WorkerProcess | None:
        """`cmdline`: the process's command line as just read, if it was; `table`: the look it
        was read in."""
        try:
            flags = self._flags(proc, proc.cmdline() if cmdline is None else cmdline)
            if flags is None or proc.environ().get(SPAWN_MARKER) != self.settings.hive_id:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            under = proc.children(recursive=True) if table is None else table.descendants(proc.pid)
            rss = proc.memory_info().rss + resident(under)
            started = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return WorkerProcess(
            pid=proc.pid,
            worker_id=flags["--worker-id"],
            model=flags.get("--model-id") or self._model_name(flags.get("--model", "")),
            port=int(flags["--port"]),
            uptime_s=round(max(0.0, time.time() - started), 3),
            memory_bytes=rss,
            cpu_set=flags.get("--cpu-set"),
        )

    def _model_name(self, ref: str) -> str:
        try:
            return self.catalog.resolve(ref).id
        except RbeeError:
            return ref

    # -- spawning ------------------------------------------------------------------------

    async def spawn(
        self, request: SpawnRequest, device_problem: str | None, usable: Sequence[str] = ()
    ) -> SpawnResponse:
        """Start a worker; `device_problem` is why its device cannot be used here, if it cannot,
        and `usable` the devices that can."""
        if device_problem is not None:
            raise BadRequest(
                f"hive {self.settings.hive_id} cannot start a worker on {request.device} "
                f"(it can on {', '.join(usable) or 'none'}): {device_problem}",
                code="device_unavailable",
            )
        # A split worker's layers on its RPC servers are its "GPU" layers, whatever its device.
        cpu = request.device.startswith("cpu") and not request.rpc_tunnels
        if request.gpu_layers is not None and cpu:
            raise BadRequest("gpu_layers needs a GPU device, e.g. cuda:0", code="bad_request")
        model = self.catalog.resolve(request.model)
        if model.format != "gguf":
            raise BadRequest(f"{model.id!r} is {model.format}; {WORKER_EXECUTABLE} loads GGUF")
        if request.worker_id is not None and not WORKER_ID_PATTERN.match(request.worker_id):
            raise BadRequest(f"{quote(request.worker_id)} is not a valid worker id")
        async with self._lock:
            running = await asyncio.to_thread(self.processes)  # reads /proc: off the loop
            if request.worker_id in {w.worker_id for w in running}:
                raise Conflict(f"worker {quote(request.worker_id)} is already running on this hive")
            taken = {w.port for w in running} | self._reserved
            cores = self._place(running, request.cores)
            port = pick_port(self.settings.host, self.settings.port_range, taken)
            if port is None:
                raise Unavailable(
                    f"no free port in {self.settings.worker_ports} on hive "
                    f"{self.settings.hive_id}; stop a worker or widen --worker-ports",
                    code="no_free_port",
                )
            self._reserved.add(port)
            self._reserved_cores[port] = cores.cpus
        worker_id = request.worker_id or f"{self.settings.hive_id}-{port}"
        try:
            # In a thread: the standby may still be finishing its imports before it forks.
            popen, log_path = await asyncio.to_thread(
                self._start, worker_id, model, port, request, cores
            )
            try:
                timeout_s = request.load_timeout_s or self.settings.spawn_timeout
                await self._wait_ready(popen, port, log_path, timeout_s)
            except asyncio.CancelledError:
                # Whoever asked left (the queen gave up waiting): a worker nobody waits for
                # must not keep running, or the model ends up started twice.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                raise
        finally:
            self._reserved.discard(port)
            self._reserved_cores.pop(port, None)
        url = http_url(self.settings.scheme, self.settings.public_host, port)
        return SpawnResponse(
            worker_id=worker_id,
            pid=popen.pid,
            port=port,
            url=url,
            cpu_set=format_cpu_set(cores.cpus),
            shared_cores=cores.shared,
        )

    def _place(self, running: Sequence[WorkerProcess], wanted: int | None) -> CorePlacement:
        """Cores for a new worker, given those its running (and starting) workers hold."""
        held = [self._cores_of(w) for w in running] + list(self._reserved_cores.values())
        return place_cores(self._machine, held, wanted)

    def _cores_of(self, worker: WorkerProcess) -> tuple[int, ...]:
        # A worker started without a CPU set may run anywhere: it counts as holding every core.
        try:
            return parse_cpu_set(worker.cpu_set) if worker.cpu_set else self._machine
        except ValueError:
            return self._machine

    def command(
        self,
        worker_id: str,
        model: CatalogModel,
        port: int,
        request: SpawnRequest,
        cores: CorePlacement,
    ) -> list[str]:
        s = self.settings
        # A bundled model goes by name (the worker finds its file); others by path. Either
        # way the worker announces the catalog id, the name the queen routes by.
        model_arg = model.id if model.source == "bundled" else model.path
        return [
            s.worker_command,
            *("--model", model_arg, "--model-id", model.id, "--port", str(port)),
            *("--queen-url", s.queen_url),
            *("--worker-id", worker_id, "--hive-id", s.hive_id),
            *("--host", s.host, "--advertise-host", s.public_host),
            *("--device", request.device, "--slots", str(request.slots)),
            *("--ctx-size", str(request.ctx_size)),
            # auto is the worker's own default: said only when something else was asked.
            *(
                ("--kv-cache-type", request.kv_cache_type)
                if request.kv_cache_type != "auto"
                else ()
            ),
            *(("--gpu-layers", str(request.gpu_layers)) if request.gpu_layers is not None else ()),
            *(
                ("--prompt-cache", str(request.prompt_cache_bytes))
                if request.prompt_cache_bytes is not None
                else ()
            ),
            *("--heartbeat-interval", str(s.heartbeat_interval)),
            *(["--embedding"] if request.embedding else []),
            *(["--rerank"] if request.rerank else []),
            *(
                ("--keep-alive", str(request.keep_alive_s))
                if request.keep_alive_s is not None
                else ()
            ),
            # Its own cores, one thread each; spinning threads on shared cores starve each other.
            *("--cpu-set", format_cpu_set(cores.cpus)),
            *(("--wait-policy", "passive") if cores.shared else ()),
            # The hive's certificate serves its workers too: they are on the same machine.
            *(("--tls-cert", str(s.tls[0]), "--tls-key", str(s.tls[1])) if s.tls else ()),
            # And they answer to the same host names as the hive.
            *(arg for host in s.allowed_host for arg in ("--allowed-host", host)),
            *split_flags(request),
        ]

    def _start(
        self,
        worker_id: str,
        model: CatalogModel,
        port: int,
        request: SpawnRequest,
        cores: CorePlacement,
    ) -> tuple[subprocess.Popen[bytes] | Forked, Path]:
        # Pinned to its device: a CUDA worker sees only its GPU, a CPU worker none.
        device_env = device_environment(parse_device(request.device))
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(worker_id)
        rotate_log(log_path)  # a worker id used before keeps its earlier worker's log as .1
        command = self.command(worker_id, model, port, request, cores)
        log_path.write_bytes(b"")  # a fork of the standby appends to it
        forked = self.standby.take(command[1:], device_env, log_path)
        if forked is not None:
            return forked, log_path
        self.standby.start()  # none runs (it died, or was never started): one for next time
        env = worker_env(os.environ, self.settings.hive_id, self.settings.token)
        env.update(device_env)
        try:
            with log_path.open("wb") as log:
                popen = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # the hive's signals must not reach its workers
                )
        except OSError as exc:
            raise WorkerStartFailed(
                f"cannot start {self.settings.worker_command}: {exc.strerror or exc}"
            ) from None
        self._children[popen.pid] = popen
        return popen, log_path

    def log_path(self, worker_id: str) -> Path:
        return self.settings.log_dir / f"worker-{worker_id}.log"

    def log_tail(self, worker_id: str, lines: int) -> str:
        """The last `lines` lines of a worker's log (running or stopped: its log stays)."""
        if not WORKER_ID_PATTERN.match(worker_id):
            raise BadRequest(f"{quote(worker_id)} is not a valid worker id")
        try:
            return last_lines(self.log_path(worker_id), lines)
        except FileNotFoundError:
            raise NotFound(
                f"hive {self.settings.hive_id} has no log of a worker {quote(worker_id)}",
                code="worker_log_not_found",
            ) from None

    async def _wait_ready(
        self, popen: subprocess.Popen[bytes] | Forked, port: int, log_path: Path, timeout_s: float
    ) -> None:
        """`timeout_s`: the queen's load deadline for the model's size, or --spawn-timeout.
        Asks the worker's `/health` to answer once its model is loaded (`wait`), so that the
        hive hears of it at once without asking over and over while llama.cpp loads."""
        health = f"{self.settings.scheme}://{self.settings.local_host}:{port}/health"
        deadline = self._clock() + timeout_s
        while True:
            code = await asyncio.to_thread(popen.poll)  # a fork's code: its standby tells it
            if code is not None:
                how = "" if code == EXIT_UNKNOWN else f" with code {code}"
                raise WorkerStartFailed(
                    f"the worker exited{how} during start-up; "
                    f"its last output:\n{output_tail(log_path)}"
                )
            asked = self._clock()
            with contextlib.suppress(httpx.HTTPError):
                answer = await self._http.get(
                    health, params={"wait": HEALTH_WAIT_S}, timeout=HEALTH_WAIT_S + 2.0
                )
                if answer.status_code == 200:
                    return
            if self._clock() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                await asyncio.to_thread(popen.wait)
                raise WorkerStartFailed(
                    f"the worker was not ready after {timeout_s:g}s and was stopped (raise the "
                    f"queen's --spawn-timeout or --load-timeout-per-gib); its last output:\n"
                    f"{output_tail(log_path)}"
                )
            if self._clock() - asked < HEALTH_WAIT_S / 2:  # not listening yet, or said no at once
                await asyncio.sleep(READY_POLL_S)

    # -- stopping ------------------------------------------------------------------------

    def _worker(self, pid: int) -> tuple[psutil.Process, WorkerProcess] | None:
        try:
            proc = psutil.Process(pid)
        except (psutil.NoSuchProcess, ValueError):
            return None
        worker = self._inspect(proc)
        return None if worker is None else (proc, worker)

    async def stop(self, pid: int, worker_id: str | None = None) -> WorkerStopped:
        found = await asyncio.to_thread(self._worker, pid)  # reads /proc: off the loop
        if found is None or worker_id not in (None, found[1].worker_id):
            which = "a worker" if worker_id is None else f"worker {quote(worker_id)}"
            raise NotFound(
                f"pid {pid} is not {which} of hive {self.settings.hive_id}; nothing was signalled",
                code="not_a_worker",
            )
        proc, worker = found
        sent: Literal["SIGTERM", "SIGKILL"] = "SIGTERM"
        exit_code: int | None = None
        try:
            proc.terminate()  # psutil checks the pid was not reused since it was inspected
            try:
                exit_code = await exited(proc, self.settings.stop_grace)
            except psutil.TimeoutExpired:
                sent = "SIGKILL"
                proc.kill()
                exit_code = await exited(proc, 10.0)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            # Killed but not yet gone (a zombie whose parent has not reaped it): the signal was
            # sent, which is all a stop can promise; its exit code is unknown.
            log.warning("worker pid %d was sent SIGKILL but has not exited yet", pid)
        if exit_code is None:  # not the hive's child: a fork of its standby, which tells it
            exit_code = await asyncio.to_thread(self.standby.exit_code, pid)
        self.reap()
        return WorkerStopped(
            pid=pid,
            worker_id=worker.worker_id,
            signal=sent,
            exit_code=exit_code,
            memory_bytes=worker.memory_bytes,
        )

    def reap(self) -> None:
        # Runs in threads too (listing processes): pop, as another reap may be at the same pid.
        for pid, popen in list(self._children.items()):
            if popen.poll() is not None:
                self._children.pop(pid, None)
