"""Child processes started without copying the parent, watched from the event loop.

uvloop starts a subprocess with fork(): the kernel copies the page tables of the whole
worker (~60 MB of Python) first, ~10 ms on our two-core machine, and a swap waits for it.
CPython's `subprocess.Popen` uses vfork() (posix_spawn's way) when no Python code has to run
in the child, ~0.3 ms: `spawn` starts a child so, its death with the parent arranged by
`setpriv --pdeathsig` (util-linux) rather than by a `preexec_fn`, which would force a fork
(and is the way where no setpriv has that option).
`Child` then reads its output and waits for its end on the running loop, told by the kernel
(a pidfd) rather than by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

import psutil

POLL_S = 0.01  # how often an end is looked for where the kernel cannot say (no pidfd)
READ_BYTES = 64 * 1024


def dies_with(parent: int) -> Callable[[], None]:
    """For a child before its exec (a fork, then; `spawn` uses it where setpriv is missing): be
    SIGKILLed when the parent dies, however it dies. A parent that died before the child asked
    is checked for by pid."""

    def child() -> None:
        with contextlib.suppress(Exception):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return child


@functools.cache
def pdeathsig_prefix() -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL --` where util-linux's setpriv has that option (2.33 and
    later), else nothing. Asked once per process (a standby asks before it forks its workers).
    SIGKILL: a child with nobody left to answer has nothing to save."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    if setpriv is None:
        return ()
    try:
        usage = subprocess.run(
            [setpriv, "--help"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--") if "--pdeathsig" in usage else ()


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start `argv` with its output (stdout and stderr) on a pipe, stdin empty, no other file
    of ours inherited, SIGKILLed when this process dies, however it dies (Linux; elsewhere it
    outlives us). Raises OSError when it cannot start."""
    # With setpriv, the same pid runs the command once setpriv has set it up.
    prefix = pdeathsig_prefix()
    before_exec: Callable[[], None] | None = None
    if sys.platform == "linux" and not prefix:
        before_exec = dies_with(os.getpid())
    return subprocess.Popen(
        [*prefix, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        close_fds=True,
        preexec_fn=before_exec,
    )


async def ended(pid: int) -> None:
    """Returns once process `pid` has ended (exited, or a zombie not yet reaped), or at once if
    there is none."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or gone already
        while True:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            await asyncio.sleep(POLL_S)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


class Child:
    """A process started by `spawn`: its output as a stream, its end awaited on the loop."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._stdout: asyncio.StreamReader | None = None

    @property
    def returncode(self) -> int | None:
        """Its exit code once `wait` has seen it end (-N: killed by signal N)."""
        return self._popen.returncode

    def stdout(self) -> asyncio.StreamReader:
        """Its output, read on the running loop from now on (call once, within the loop)."""
        assert self._stdout is None
        pipe = self._popen.stdout
        assert pipe is not None
        reader = asyncio.StreamReader()
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                reader.feed_data(data)
                return
            loop.remove_reader(fd)
            pipe.close()
            reader.feed_eof()

        loop.add_reader(fd, readable)
        self._stdout = reader
        return reader

    async def wait(self) -> int:
        if self._popen.returncode is None:
            await ended(self.pid)
            self._popen.wait()  # it has ended: reaped at once
            if self._stdout is None and self._popen.stdout is not None:
                self._popen.stdout.close()  # nobody reads it
        assert self._popen.returncode is not None
        return self._popen.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()
