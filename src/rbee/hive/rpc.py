"""RPC servers a hive lends to split workers: started, found and stopped with no list kept.

Each one is a small process of its own, `python -m rbee.hive.rpc …` (its "part"), which
- runs llama.cpp's `ggml-rpc-server` as its child, on 127.0.0.1 only (the child is killed when
  the part dies, however it dies);
- puts the authenticated tunnel (`rbee.common.tunnel.TunnelServer`) on the hive's address in
  front of it: only a peer that proves the cluster token (and, when the queen named it, only the
  main worker's host) reaches the RPC server;
- lives as long as its worker uses it: it stops when the RPC server dies, when it is told to
  (SIGTERM: the worker was stopped, evicted or unloaded), when the worker has not connected by
  its connect timeout, and when the worker's connections have all been closed for a grace
  period (the worker's `llama-server` died or stopped).

Like workers, parts carry the hive's marks (`--hive-id` on the command line, the
`RBEE_SPAWNED_BY_HIVE` environment variable), so a restarted hive finds them; at start it stops
those that no worker is connected to any more (`sweep`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import psutil

from rbee.common.children import dies_with
from rbee.common.cpus import usable_cpus
from rbee.common.errors import BadRequest, NotFound, RbeeError, Unavailable, quote
from rbee.common.gpu import default_llama_server
from rbee.common.tunnel import TunnelServer
from rbee.common.worker_command import parse_flags
from rbee.contracts.rpc import RpcServerInfo, RpcServerRequest, RpcServerStopped
from rbee.hive.ports import pick_port
from rbee.hive.proctable import ProcessTable, resident
from rbee.hive.settings import HiveSettings
from rbee.hive.supervisor import SPAWN_MARKER
from rbee.hive.worker_launch import worker_env

log = logging.getLogger("rbee.hive.rpc")
MODULE = "rbee.hive.rpc"
RPC_SERVER_BINARY = "ggml-rpc-server"
IDLE_GRACE_S = 15.0  # a worker's llama-server reconnects within this while it loads
SWEEP_GRACE_S = 30.0  # a part younger than this may still be waiting for its worker
READY_TIMEOUT_S = 60.0


class RpcStartFailed(RbeeError):
    status_code = 500
    type = "server_error"
    code = "rpc_server_start_failed"


def default_rpc_server() -> str:
    """`ggml-rpc-server`, next to the `llama-server` ./dev (or `rbee hive install`) put there."""
    candidate = Path(default_llama_server()).parent / RPC_SERVER_BINARY
    return str(candidate) if candidate.exists() else RPC_SERVER_BINARY


def part_flags(cmdline: Sequence[str], hive_id: str) -> dict[str, str] | None:
    """The flags of one of this hive's parts' command lines, or None for any other process."""
    if MODULE not in cmdline[:4]:
        return None
    flags = parse_flags(cmdline)
    if flags.get("--hive-id") != hive_id or not flags.get("--port", "").isdigit():
        return None
    return flags


def _established(proc: psutil.Process, port: int) -> int:
    """Connections a worker has open to the part's tunnel now."""
    with contextlib.suppress(psutil.Error):
        return sum(
            1
            for c in proc.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
        )
    return 0


def _listening(pid: int, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(
            c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
            for c in psutil.Process(pid).net_connections(kind="tcp")
        )
    return False


class RpcServers:
    """The hive's side: start, list and stop its parts."""

    def __init__(self, settings: HiveSettings, rpc_server: str | None = None) -> None:
        self.settings = settings
        self.rpc_server = rpc_server or default_rpc_server()
        self._lock = asyncio.Lock()
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # for reaping only

    def _inspect(
        self,
        proc: psutil.Process,
        cmdline: list[str] | None = None,
        table: ProcessTable | None = None,
    ) -> tuple[RpcServerInfo, psutil.Process] | None:
        """`cmdline`: the process's command line as just read, if it was; `table`: the look it
        was read in."""
        try:
            flags = part_flags(
                proc.cmdline() if cmdline is None else cmdline, self.settings.hive_id
            )
            if flags is None or proc.environ().get(SPAWN_MARKER) != self.settings.hive_id:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            under = proc.children(recursive=True) if table is None else table.descendants(proc.pid)
            rss = proc.memory_info().rss + resident(under)
            started = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        info = RpcServerInfo(
            rpc_id=flags.get("--rpc-id", ""),
            worker_id=flags.get("--worker-id", ""),
            pid=proc.pid,
            host=self.settings.public_host,
            port=int(flags["--port"]),
            tls="--tls-cert" in flags,
            devices=flags.get("--devices", "cpu:0").split(","),
            bytes=int(flags.get("--bytes", "0") or 0),
            uptime_s=round(max(0.0, time.time() - started), 3),
            memory_bytes=rss,
        )
        return info, proc

    def _found(
        self, table: ProcessTable | None = None
    ) -> list[tuple[RpcServerInfo, psutil.Process]]:
        self.reap()
        table = table or ProcessTable.read()
        found = []
        for proc in table.processes:
            if (part := self._inspect(proc, proc.info.get("cmdline"), table)) is not None:
                found.append(part)
        return sorted(found, key=lambda p: p[0].port)

    def listed(self) -> list[RpcServerInfo]:
        return [info for info, _ in self._found()]

    def memory_held(self, table: ProcessTable | None = None) -> tuple[int, frozenset[int]]:
        """What the RPC servers of this hive hold, their share of its `--memory-limit`: RAM
        (resident, or the bytes the queen's plan gave them while they still receive them), and
        the pids of their processes (for what they hold on GPUs). `table`: a look just taken."""
        table = table or ProcessTable.read()
        ram, pids = 0, set()
        for info, proc in self._found(table):
            ram += max(info.memory_bytes, info.bytes)
            pids.add(info.pid)
            pids.update(child.pid for child in table.descendants(proc.pid))
        return ram, frozenset(pids)

    def command(
        self, rpc_id: str, request: RpcServerRequest, port: int, connect_timeout_s: float
    ) -> list[str]:
        s = self.settings
        threads = request.threads or len(usable_cpus())
        return [
            sys.executable,
            *("-m", MODULE),
            *("--hive-id", s.hive_id, "--rpc-id", rpc_id, "--worker-id", request.worker_id),
            *("--host", s.host, "--port", str(port)),
            *("--devices", ",".join(request.devices), "--bytes", str(request.bytes)),
            *("--threads", str(threads), "--rpc-server", self.rpc_server),
            *("--connect-timeout", str(connect_timeout_s)),
            *(("--allow-peer", request.allow_peer) if request.allow_peer else ()),
            *(["--cache"] if request.cache else []),
            *(("--tls-cert", str(s.tls[0]), "--tls-key", str(s.tls[1])) if s.tls else ()),
        ]

    async def start(self, request: RpcServerRequest, taken: set[int]) -> RpcServerInfo:
        """Start a part for a worker; returns once its tunnel listens. `taken`: ports the
        hive's workers hold."""
        if not self.settings.token:
            raise BadRequest(
                f"hive {self.settings.hive_id} has no cluster token: an RPC server's tunnel "
                "admits only peers that prove it, so none can be started",
                code="rpc_needs_token",
            )
        kinds = {d.split(":")[0] for d in request.devices}
        if len(kinds) > 1 or kinds - {"cpu", "cuda"}:
            raise BadRequest(
                "an RPC server exposes cpu:0, or one or more cuda:N", code="bad_request"
            )
        async with self._lock:
            found = await asyncio.to_thread(self._found)
            ports = taken | {info.port for info, _ in found}
            port = pick_port(self.settings.host, self.settings.port_range, ports)
            if port is None:
                raise Unavailable(
                    f"no free port in {self.settings.worker_ports} on hive "
                    f"{self.settings.hive_id} for an RPC server",
                    code="no_free_port",
                )
            rpc_id = f"{request.worker_id}@{self.settings.hive_id}"
            if any(info.rpc_id == rpc_id for info, _ in found):
                raise BadRequest(
                    f"hive {self.settings.hive_id} already lends an RPC server to worker "
                    f"{quote(request.worker_id)}",
                    code="conflict",
                )
            timeout = request.connect_timeout_s or self.settings.spawn_timeout
            popen, log_path = self._spawn(rpc_id, request, port, timeout)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not await asyncio.to_thread(_listening, popen.pid, port):
                if popen.poll() is not None or time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(popen.pid, signal.SIGKILL)
                    await asyncio.to_thread(popen.wait)
                    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                    raise RpcStartFailed(
                        f"the RPC server for worker {request.worker_id} did not start on hive "
                        f"{self.settings.hive_id}; its last output:\n{tail.strip()}"
                    )
                await asyncio.sleep(0.1)
        part = await asyncio.to_thread(self._inspect, psutil.Process(popen.pid))
        if part is None:
            raise RpcStartFailed(f"the RPC server for worker {request.worker_id} exited at once")
        log.info("RPC server %s for worker %s serves on port %d", rpc_id, request.worker_id, port)
        return part[0]

    def _spawn(
        self, rpc_id: str, request: RpcServerRequest, port: int, connect_timeout_s: float
    ) -> tuple[subprocess.Popen[bytes], Path]:
        env = worker_env(os.environ, self.settings.hive_id, self.settings.token)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        safe = rpc_id.replace("@", "-").replace("/", "-")
        log_path = self.settings.log_dir / f"rpc-{safe}.log"
        try:
            with log_path.open("wb") as out:
                popen = subprocess.Popen(
                    self.command(rpc_id, request, port, connect_timeout_s),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise RpcStartFailed(f"cannot start the RPC server: {exc.strerror or exc}") from None
        self._children[popen.pid] = popen
        return popen, log_path

    async def stop(self, key: str) -> RpcServerStopped:
        """Stop a part by its pid or its rpc id (the RPC server dies with it)."""
        found = await asyncio.to_thread(self._found)
        match = [(i, p) for i, p in found if str(i.pid) == key or i.rpc_id == key]
        if not match:
            raise NotFound(
                f"{quote(key)} is not an RPC server of hive {self.settings.hive_id}",
                code="not_an_rpc_server",
            )
        info, proc = match[0]
        sent = await asyncio.to_thread(_terminate, proc, self.settings.stop_grace)
        self.reap()
        return RpcServerStopped(pid=info.pid, rpc_id=info.rpc_id, signal=sent)

    async def stop_for(self, worker_id: str) -> list[RpcServerStopped]:
        found = await asyncio.to_thread(self._found)
        return [await self.stop(str(i.pid)) for i, _ in found if i.worker_id == worker_id]

    async def sweep(self) -> list[str]:
        """At the hive's start: stop the parts left by an earlier run that no worker uses any
        more (none connected, and old enough to have been connected to)."""
        stopped = []
        for info, proc in await asyncio.to_thread(self._found):
            if info.uptime_s >= SWEEP_GRACE_S and _established(proc, info.port) == 0:
                await asyncio.to_thread(_terminate, proc, self.settings.stop_grace)
                log.info("stopped RPC server %s: no worker uses it any more", info.rpc_id)
                stopped.append(info.rpc_id)
        self.reap()
        return stopped

    def reap(self) -> None:
        for pid, popen in list(self._children.items()):
            if popen.poll() is not None:
                self._children.pop(pid, None)


def _terminate(proc: psutil.Process, grace: float) -> Literal["SIGTERM", "SIGKILL"]:
    try:
        proc.terminate()
        try:
            proc.wait(grace)
        except psutil.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(psutil.TimeoutExpired):
                proc.wait(10.0)
            return "SIGKILL"
    except psutil.NoSuchProcess:
        pass
    return "SIGTERM"


# -- the part itself -----------------------------------------------------------------------


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rpc_server_command(
    binary: str, port: int, devices: Sequence[str], threads: int, cache: bool
) -> tuple[list[str], dict[str, str]]:
    """`ggml-rpc-server` on loopback for these devices: GPUs by CUDA_VISIBLE_DEVICES (it then
    exposes them all), the CPU by name (no GPU visible).

    Its CPU threads wait passively between graph computations (OMP_WAIT_POLICY, unless the
    hive's environment sets it): an RPC server computes in bursts between network round trips,
    and llama.cpp's OpenMP threads otherwise spin for milliseconds after each one, taking cores
    from the hive's own workers and, where parts of one split share cores, from the split's
    other parts and the tunnels that carry its round trips."""
    env: dict[str, str] = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    args = [binary, "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)]
    if all(d.startswith("cuda:") for d in devices):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(d.split(":")[1] for d in devices)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        args += ["--device", "CPU"]
    if cache:
        args.append("--cache")
    return args, env


async def run_part(args: argparse.Namespace) -> int:
    token = os.environ.get("RBEE_TOKEN", "")
    if not token:
        print("rbee-rpc: no RBEE_TOKEN: refusing to open a tunnel", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def finish(code: int, why: str) -> None:
        if not done.done():
            log.info("RPC server %s stops: %s", args.rpc_id, why)
            done.set_result(code)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, finish, 0, "asked to")
    port = _free_loopback_port()
    command, extra = rpc_server_command(
        args.rpc_server, port, args.devices.split(","), args.threads, args.cache
    )
    server = await asyncio.create_subprocess_exec(
        *command,
        env={**os.environ, **extra},
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=dies_with(os.getpid()),  # prctl only, before exec
    )
    server_exit = asyncio.ensure_future(server.wait())
    server_exit.add_done_callback(
        lambda f: finish(1, f"the RPC server exited with code {f.result()}")
    )
    for _ in range(int(READY_TIMEOUT_S / 0.05)):
        if done.done():
            break
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.05)
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    idle_timer: asyncio.TimerHandle | None = None

    def idle_check() -> None:
        if tunnel.open == 0:
            finish(0, "its worker's connections all closed")

    def never_connected() -> None:
        if tunnel.admitted == 0:
            finish(0, "its worker never connected")

    def idle() -> None:
        nonlocal idle_timer
        if idle_timer is not None:
            idle_timer.cancel()
        idle_timer = loop.call_later(args.idle_grace, idle_check)

    tunnel = TunnelServer(
        token=token,
        name=args.rpc_id,
        target_port=port,
        allow_peer=args.allow_peer,
        tls=tls,
        on_idle=idle,
    )
    if not done.done():
        await tunnel.start(args.host, args.port)
        log.info("RPC server %s: tunnel on %s:%d", args.rpc_id, args.host, args.port)
        loop.call_later(args.connect_timeout, never_connected)
    code = await done
    await tunnel.close()
    if server.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        await server.wait()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--hive-id", required=True)
    parser.add_argument("--rpc-id", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--devices", default="cpu:0")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rpc-server", default=default_rpc_server())
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--idle-grace", type=float, default=IDLE_GRACE_S)
    parser.add_argument("--allow-peer")
    parser.add_argument("--cache", action="store_true")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(run_part(args))


if __name__ == "__main__":
    sys.exit(main())
