"""A LAN of test "machines" on this host: one network namespace per machine, joined by a bridge.

Each `Lan` takes its own /28 of 198.18.0.0/24 (RFC 2544's range for network tests), so several
test runs can build LANs at the same time. The bridge lives in a namespace of its own (the
"switch"); the process that builds the LAN sits on it too, at `gateway`, so a test reaches every
machine and every machine reaches the test's own daemons. There is no default route anywhere:
traffic goes only to loopback and to these namespaces.

Everything a `Lan` makes (namespaces, links, processes) is removed when it is left, also when a
test fails, and a LAN left behind by a killed run is cleared before its subnet is used again.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

SUPERNET = ipaddress.IPv4Network("198.18.0.0/24")
SUBNETS = list(SUPERNET.subnets(new_prefix=28))
LOCK_DIR = Path("/run/rbee-netns")


def unavailable_reason() -> str | None:
    """None when network namespaces can be made here; otherwise one line saying why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"rbee-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


class Lan:
    """`with Lan(["queen", "box1"]) as lan:` — machines named by the caller, each with `eth0`."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError("hosts must be distinct names")
        if len(hosts) > SUBNETS[0].num_addresses - 3:
            raise ValueError(f"at most {SUBNETS[0].num_addresses - 3} hosts per LAN")
        self.hosts = list(hosts)
        self.index = -1
        self._lock: TextIO | None = None
        self._procs: list[subprocess.Popen[Any]] = []

    # --- names and addresses -------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"rbee{self.index}"

    def namespace(self, host: str) -> str:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} on this LAN ({', '.join(self.hosts)})")
        return f"{self.prefix}-{host}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

    @property
    def gateway(self) -> str:
        """The address of the process that built the LAN (the root namespace) on it."""
        return str(SUBNETS[self.index][1])

    def address(self, host: str) -> str:
        self.namespace(host)
        return str(SUBNETS[self.index][2 + self.hosts.index(host)])

    # --- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> Lan:
        self._claim_subnet()
        try:
            self._clear()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _claim_subnet(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        for index in range(len(SUBNETS)):
            handle = (LOCK_DIR / f"{index}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self.index, self._lock = index, handle
            return
        raise RuntimeError(f"all {len(SUBNETS)} test subnets of {SUPERNET} are in use")

    def _build(self) -> None:
        net = SUBNETS[self.index]
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        # The root namespace's leg: its name must be unique on the host, the rest need not be.
        _ip(
            "link",
            "add",
            f"{self.prefix}gw",
            "type",
            "veth",
            "peer",
            "name",
            "gw",
            "netns",
            self.switch,
        )
        _ip("addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", f"{self.prefix}gw")
        _ip("link", "set", f"{self.prefix}gw", "up")
        _ip("-n", self.switch, "link", "set", "gw", "master", "br0", "up")
        for n, host in enumerate(self.hosts):
            ns = self.namespace(host)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            port = f"p{n}"
            _ip(
                "-n",
                self.switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _clear(self) -> None:
        """Remove whatever a killed run left under this subnet's names."""
        listed = _ip("netns", "list", check=False).stdout.split()
        for name in listed:
            if name.startswith(f"{self.prefix}-"):
                self._kill_namespace_processes(name)
                _ip("netns", "delete", name, check=False)
        _ip("link", "delete", f"{self.prefix}gw", check=False)

    def close(self) -> None:
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        if self.index >= 0:
            self._clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @staticmethod
    def _kill_namespace_processes(ns: str) -> None:
        """Processes that left their parent (daemons, ssh sessions) die with their machine."""
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    # --- using the machines -----------------------------------------------------------------

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process on `host`; it is stopped when the LAN is closed."""
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(host), *argv], **kwargs
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace(host), *argv],
            check=check,
            timeout=timeout,
            **kwargs,
        )

    def cut(self, host: str) -> None:
        """Pull the machine's cable: its link goes down and packets to and from it are lost."""
        _ip("-n", self.namespace(host), "link", "set", "eth0", "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.namespace(host), "link", "set", "eth0", "up")


def _stop(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()
