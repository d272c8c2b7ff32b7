"""Start real rbee daemons on free loopback ports and wait until they answer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import psutil

# Set to a fresh id in a test run's environment before it starts anything: every process the run
# starts, directly or through a daemon, inherits it, and the run ends what still carries it.
RUN_MARKER = "RBEE_TEST_RUN"
# Set to a fresh id for each ServerProcess: what the daemon started (a hive's workers live in
# sessions of their own and outlive it by design, an engine outlives a killed worker for a moment)
# ends with it when the test is done with it.
DAEMON_MARKER = "RBEE_TEST_DAEMON"


def run_mark() -> dict[str, str]:
    """The run's mark, for an environment built from scratch (a login session, a LAN machine)."""
    mark = os.environ.get(RUN_MARKER)
    return {RUN_MARKER: mark} if mark else {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def console_script(name: str) -> str:
    """The path of one of our console scripts, next to the running interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def processes_with_in_argv(needle: str) -> list[str]:
    """Every process on this host (network namespaces share the pid space) whose command line
    holds `needle`: a secret must never be found there."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in argv:
            found.append(f"{cmdline.parent.name}: {argv}")
    return found


def process_clock() -> float:
    """Now, on the clock `Survivor.started` is read from: on Linux the seconds since boot that
    the kernel counts process starts in (psutil's create_time adds a boot time rounded to the
    second, and so can be a second off the wall clock)."""
    if sys.platform == "linux":
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.time()


def _started(proc: psutil.Process) -> float:
    if sys.platform == "linux":
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return ticks / os.sysconf("SC_CLK_TCK")
    return proc.create_time()


@dataclass(frozen=True)
class Survivor:
    """A process still alive that carries a run's mark."""

    pid: int
    started: float  # on process_clock()
    argv: str


def marked_processes(marker: str, value: str) -> list[psutil.Process]:
    """Every live process that inherited `marker=value` in its environment (as read at its
    exec; only root reads other users'), oldest first. Zombies are dead and carry nothing."""
    found = []
    for proc in psutil.process_iter(["environ", "create_time"]):
        environ = proc.info["environ"] or {}
        if proc.pid != os.getpid() and environ.get(marker) == value:
            found.append(proc)
    return sorted(found, key=lambda p: p.info["create_time"] or 0.0)


def end_marked_processes(
    marker: str, value: str, *, wait_s: float = 10.0, term_s: float = 5.0
) -> list[Survivor]:
    """Stop whatever still carries `marker=value` after `wait_s` (time for processes already
    told to stop to finish): SIGTERM, so a worker still removes its socket directory, and SIGKILL
    what is left after `term_s`. Returns what had to be stopped."""
    deadline = time.monotonic() + wait_s
    while (procs := marked_processes(marker, value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            argv = " ".join(proc.cmdline()) or proc.name()
            survivors.append(Survivor(proc.pid, _started(proc), argv))
            proc.terminate()  # psutil checks the pid was not reused since it was listed
    for proc in _still_running(procs, term_s):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _still_running(procs, 10.0)
    return survivors


def _still_running(procs: Sequence[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `procs` still running after up to `timeout_s`; a zombie has ended, only its
    parent has not collected it yet."""

    def running(proc: psutil.Process) -> bool:
        try:
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    while (left := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


class ServerProcess:
    """A daemon run as a real process, its output captured to a file for post-mortems."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        health_url: str | None = None,
        env: Mapping[str, str] | None = None,
        ready_status: int = 200,
    ) -> None:
        self.args = list(args)
        self.health_url = health_url
        self.ready_status = ready_status
        self.mark = uuid.uuid4().hex
        self.env = {**os.environ, **(env or {}), DAEMON_MARKER: self.mark}
        self._log = tempfile.NamedTemporaryFile(prefix="rbee-proc-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        if self.health_url is not None:
            try:
                self.wait_healthy(timeout_s)
            except BaseException:
                # A `with` block whose __enter__ raised never calls __exit__.
                self.end()
                raise
        return self

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        assert self.proc is not None
        assert self.health_url is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.args[0]} exited {self.proc.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(self.health_url, timeout=1.0).status_code == self.ready_status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.args[0]} not healthy after {timeout_s}s:\n{self.output()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def end(self) -> None:
        """Stop the daemon and whatever it started that still runs."""
        self.stop()
        end_marked_processes(DAEMON_MARKER, self.mark, wait_s=0.0, term_s=10.0)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)
