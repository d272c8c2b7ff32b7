"""Starting and stopping rbee's daemons on this machine: find the program, run it in its own
session (so a Ctrl-C meant for `rbee` does not reach it), wait for `/health`, stop it with
SIGTERM and a SIGKILL fallback. Processes are identified by pid *and* start time, so a reused
pid is never mistaken for ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from rbee.cli.context import CliError
from rbee.common.sizes import format_size
from rbee.contracts.workers import http_url

HEALTH_POLL_S = 0.1
ENDED_POLL_S = 0.05  # how often a stop looks whether the process has exited


def find_program(name: str) -> str:
    """One of rbee's console scripts: next to the running interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise CliError(
        f"cannot find the `{name}` program next to {sys.executable} or on PATH — "
        "is rbee installed in this environment?"
    )


def port_in_use(host: str, port: int) -> bool:
    """True when nothing of ours could listen on host:port right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def hive_argv(
    *,
    queen_url: str | None,
    host: str,
    port: int,
    hive_id: str | None = None,
    advertise_host: str | None = None,
    models_dir: str | Path | None = None,
    worker_ports: str | None = None,
    heartbeat_interval: float | None = None,
    memory_limit: int | None = None,
) -> list[str]:
    """rbee-hive's flags, as `hive start`, `hive service` and a start over SSH pass them. A value
    left None is left out (the hive's default); no queen URL: the caller adds its own."""
    args = [] if queen_url is None else ["--queen-url", queen_url]
    args += ["--host", host, "--port", str(port)]
    for flag, value in (
        ("--hive-id", hive_id),
        ("--advertise-host", advertise_host),
        ("--models-dir", models_dir),
        ("--worker-ports", worker_ports),
        ("--heartbeat-interval", heartbeat_interval),
        ("--memory-limit", format_size(memory_limit) if memory_limit is not None else None),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


def url_for(host: str, port: int) -> str:
    """How to reach a daemon listening on host (a wildcard is reached on loopback)."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return http_url("http", host, port)


@dataclass(frozen=True)
class Started:
    """A process this command started or found: pid plus start time, its URL and its log."""

    name: str
    pid: int
    create_time: float
    url: str
    log: Path

    def process(self) -> psutil.Process | None:
        """The live process, or None when it is gone (or the pid now belongs to another)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                proc.wait(0)  # our own child: reap it
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
            return None
        return proc

    def alive(self) -> bool:
        return self.process() is not None

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(line.strip() for line in text[-lines:])


def spawn(
    name: str, args: Sequence[str], *, url: str, log: Path, env: Mapping[str, str]
) -> Started:
    """Start `args` in a new session with stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        pid = os.posix_spawn(
            args[0],
            list(args),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
            # A shell without job control starts background jobs with SIGINT ignored; a daemon
            # should not inherit that.
            setsigdef=(signal.SIGINT, signal.SIGTERM),
        )
    finally:
        os.close(fd)
    return Started(name, pid, psutil.Process(pid).create_time(), url, log)


async def wait_healthy(started: Started, timeout_s: float) -> None:
    """Poll `/health` until it answers 200; fail early with the log's last line if it died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            if not started.alive():
                tail = started.log_tail()
                raise CliError(
                    f"{started.name} exited during start-up"
                    + (f": {tail}" if tail else "")
                    + f" (log: {started.log})"
                )
            try:
                if (await http.get(f"{started.url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if loop.time() >= deadline:
                raise CliError(
                    f"{started.name} did not answer at {started.url} within {timeout_s:.0f}s "
                    f"(log: {started.log})"
                )
            await asyncio.sleep(HEALTH_POLL_S)


async def answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1.0) as http:
            return (await http.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


def terminate(proc: psutil.Process, timeout_s: float) -> bool:
    """SIGTERM, wait, SIGKILL. True when it stopped on SIGTERM alone."""
    try:
        proc.terminate()
    except psutil.NoSuchProcess:
        return True
    if _ended(proc, timeout_s):
        return True
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()
    _ended(proc, 5)
    return False


def _ended(proc: psutil.Process, timeout_s: float) -> bool:
    """Wait until `proc` has exited. A zombie has: what is left is for its parent to reap
    (psutil's wait on another's child would wait for that)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            proc.wait(max(0.0, min(ENDED_POLL_S, deadline - time.monotonic())))
            return True
        except psutil.NoSuchProcess:
            return True
        except psutil.TimeoutExpired:
            pass
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False


async def stop(started: Started, timeout_s: float) -> bool:
    proc = started.process()
    if proc is None:
        return True
    return await asyncio.to_thread(terminate, proc, timeout_s)
