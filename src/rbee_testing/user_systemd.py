"""A real systemd user manager (`systemd --user`) for tests, on a machine whose PID 1 is not
systemd, without touching the host.

`systemd --user` refuses to run unless /run/systemd/system exists (the mark of a systemd
machine). A holder process in a private mount namespace mounts a tmpfs on /run/systemd, makes
that directory there and then just sleeps; everything the test runs "on the systemd machine"
(the manager, `rbee ... service`, `systemctl --user`) enters that namespace with `nsenter`, so
the host never sees the mark. The manager's runtime directory (its D-Bus and private sockets)
lives on that tmpfs too.

`crash()` is a power cut: every process in the namespace but the holder is killed at once (the
manager, its units, and anything they spawned in sessions of their own), and `boot()` starts a
fresh manager on the same home directory, which starts the enabled units by itself. Leaving the
`with` block does the same cut and ends the holder, so the namespace and its mounts go away.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from rbee_testing.processes import run_mark

SYSTEMD = "/lib/systemd/systemd"
RUNTIME_DIR = "/run/systemd/rbee-user"  # on the namespace's private tmpfs
# The holder: prepare the private /run/systemd, say so, then keep the namespace alive.
HOLDER = (
    "mount -t tmpfs -o mode=0755 tmpfs /run/systemd"
    " && mkdir -p /run/systemd/system"
    f" && mkdir -m 0700 {RUNTIME_DIR}"
    " && echo ready && exec sleep infinity"
)
# What a login session on a plain machine would have; nothing of the test's own environment.
BASE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def unavailable_reason() -> str | None:
    """None when a user manager can be run here; otherwise one line saying why not."""
    if os.geteuid() != 0:
        return "a private mount namespace for systemd --user needs root"
    if not Path(SYSTEMD).exists() or shutil.which("systemctl") is None:
        return "systemd is not installed (no /lib/systemd/systemd or systemctl)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", HOLDER.replace("sleep", "true")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"unshare refused a private mount namespace: {probe.stderr.strip()}"
    return None


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class UserManager:
    """`with UserManager(home, log) as box:` a systemd user manager for the user running the
    test, with `home` as its HOME; `box.run([...])` runs a command as that user's login shell
    would. `launcher` puts the whole machine elsewhere first (`nsenter --net=PATH`)."""

    def __init__(
        self,
        home: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        launcher: Sequence[str] = (),
    ) -> None:
        self.home = home
        self.launcher = list(launcher)  # e.g. `nsenter --net=PATH`: the machine is in that netns
        self.log = log
        self.env = {
            "HOME": str(home),
            "XDG_RUNTIME_DIR": RUNTIME_DIR,
            "PATH": BASE_PATH,
            "LANG": "C.UTF-8",
            **run_mark(),  # so the test run can tell what it started
            **(env or {}),
        }
        self._holder: subprocess.Popen[str] | None = None
        self._manager: subprocess.Popen[bytes] | None = None

    # --- the namespace --------------------------------------------------------------------

    def __enter__(self) -> UserManager:
        self._holder = subprocess.Popen(
            [*self.launcher, "unshare", "-m", "--propagation", "private", "sh", "-c", HOLDER],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert self._holder.stdout is not None
            if self._holder.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the namespace holder exited {self._holder.wait(10)}")
            self.boot()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.crash()
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait(10)
            if self._holder.stdout is not None:
                self._holder.stdout.close()
            self._holder = None

    @property
    def holder_pid(self) -> int:
        assert self._holder is not None, "not entered"
        return self._holder.pid

    def pids(self) -> list[int]:
        """Live processes inside the namespace, the holder excepted."""
        mine = _mount_ns(self.holder_pid)
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.holder_pid:
                pid = int(entry.name)
                if _mount_ns(pid) == mine and _alive(pid):
                    found.append(pid)
        return found

    def enter(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the namespace (and in the holder's network namespace, whichever it
        is); also for the machine's own daemons (an sshd) that the caller starts."""
        return ["nsenter", "-t", str(self.holder_pid), "-m", "-n", "--", *argv]

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the namespace, with the session's environment plus `env`."""
        return subprocess.run(
            self.enter(argv),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--user", *args])

    # --- power ----------------------------------------------------------------------------

    def boot(self, timeout_s: float = 60) -> None:
        """Start a user manager and wait until it has started its enabled units."""
        with self.log.open("ab") as log:
            self._manager = subprocess.Popen(
                self.enter([SYSTEMD, "--user"]),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            if self._manager.poll() is not None:
                raise RuntimeError(f"systemd --user exited {self._manager.returncode}: {self.log}")
            state = self.systemctl("is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"systemd --user is {state or 'unreachable'} after {timeout_s}s")

    def crash(self) -> None:
        """Kill the manager and everything in the namespace at once, as a power cut would."""
        deadline = time.monotonic() + 30
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if self._manager is not None:
            self._manager.wait(10)
            self._manager = None
        if pids := self.pids():
            raise RuntimeError(f"processes survived the power cut: {pids}")

    def unit_property(self, unit: str, name: str) -> str:
        return self.systemctl("show", "--value", "-p", name, unit).stdout.strip()
