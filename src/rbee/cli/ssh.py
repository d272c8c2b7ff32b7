"""Running shell scripts on another machine through the system's OpenSSH client.

Every remote operation is a POSIX `sh` script sent on the SSH channel's standard input to
`sh -s`: secrets inside a script (the cluster token) never appear on a command line on either
machine. `RBEE_SSH_COMMAND` replaces the `ssh` command line the way `GIT_SSH_COMMAND` does for
git; the user's `~/.ssh/config`, agent and known hosts apply as they do for plain `ssh`.
The same scripts run on this machine through `sh -s` (`Shell`), so local and remote behave alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rbee.cli.context import CliError
from rbee.common.lines import read_lines

SSH_COMMAND_ENV = "RBEE_SSH_COMMAND"
SSH_FAILED = 255  # what ssh itself exits with when it cannot connect or authenticate
CONNECT_TIMEOUT_S = 15
STREAM_LINES_KEPT = 50  # of a streamed script's output, for its verdict and error messages
# USER@HOST, HOST, or USER@[IPv6]; nothing that ssh could read as an option or a second word.
TARGET_PATTERN = re.compile(
    r"^(?:[A-Za-z0-9._][A-Za-z0-9._-]*@)?(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])$"
)


@dataclass(frozen=True)
class SshTarget:
    """Where to log in: `USER@HOST` or `HOST` (a name from `~/.ssh/config` works too)."""

    spec: str

    @classmethod
    def parse(cls, value: str) -> SshTarget:
        if not TARGET_PATTERN.match(value):
            raise ValueError(f"{value!r} is not USER@HOST (or HOST)")
        return cls(value)

    @property
    def host(self) -> str:
        """The HOST part, without IPv6 brackets: what the queen is told to reach."""
        return self.spec.rpartition("@")[2].strip("[]")

    def __str__(self) -> str:
        return self.spec


def ssh_command() -> list[str]:
    """The ssh program and its options: `RBEE_SSH_COMMAND`, else plain `ssh`."""
    configured = os.environ.get(SSH_COMMAND_ENV, "").strip()
    try:
        argv = shlex.split(configured) if configured else ["ssh"]
    except ValueError as exc:
        raise CliError(f"{SSH_COMMAND_ENV} is not a valid command line: {exc}") from None
    return argv or ["ssh"]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def last_lines(self, count: int = 3, *, stderr: bool = False) -> str:
        """The end of the script's output (or of stderr, where ssh complains), on one line."""
        lines = [line.strip() for line in (self.err if stderr else self.out).splitlines()]
        return " / ".join([line for line in lines if line][-count:])


class Shell:
    """Runs scripts with `sh -s` on this machine (the base of `Ssh`)."""

    where = "this machine"

    def __init__(self, *, isolated: bool = False) -> None:
        # isolated: in a session of its own, so a Ctrl-C meant for `rbee up` does not cut the
        # SSH connection that is stopping a remote hive (but then ssh cannot prompt for anything).
        self.isolated = isolated

    def argv(self, remote_command: str) -> list[str]:
        return ["sh", "-c", remote_command]

    async def run(self, script: str, *, timeout_s: float = 60.0) -> Result:
        """Run a POSIX sh script; the script itself travels on standard input."""
        return await self.run_command("sh -s", script.encode(), timeout_s=timeout_s)

    async def run_command(
        self, remote_command: str, data: bytes, *, timeout_s: float = 60.0
    ) -> Result:
        argv = self.argv(remote_command)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=self.isolated,
            )
        except OSError as exc:
            raise CliError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(data), timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        code = proc.returncode if proc.returncode is not None else -1
        return Result(code, out.decode(errors="replace"), err.decode(errors="replace"))

    async def stream(
        self, script: str, on_line: Callable[[str], None], *, timeout_s: float = 3600.0
    ) -> Result:
        """Run a script, handing each line of its output (stdout and stderr) to `on_line`."""
        argv = self.argv("sh -s")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=self.isolated,
        )
        assert proc.stdin is not None
        proc.stdin.write(script.encode())
        proc.stdin.close()
        lines: deque[str] = deque(maxlen=STREAM_LINES_KEPT)

        async def pump() -> None:
            assert proc.stdout is not None
            async for line in read_lines(proc.stdout):
                lines.append(line)
                on_line(line)
            await proc.wait()

        try:
            await asyncio.wait_for(pump(), timeout_s)
        except BaseException:
            # Whatever ends the wait (a timeout, Ctrl-C, a failing `on_line`), the script's
            # process does not outlive it.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        code = proc.returncode if proc.returncode is not None else -1
        return Result(code, "\n".join(lines), "")

    def failure(self, result: Result) -> str | None:
        """Why the transport itself failed (never, for a local shell)."""
        return None


class Ssh(Shell):
    """Runs scripts on `target` through OpenSSH."""

    def __init__(self, target: SshTarget, *, isolated: bool = False) -> None:
        super().__init__(isolated=isolated)
        self.target = target
        self.where = target.spec

    def argv(self, remote_command: str) -> list[str]:
        # Options given first win in ssh, so the user's RBEE_SSH_COMMAND overrides ours.
        return [
            *ssh_command(),
            *("-T", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"),
            self.target.spec,
            remote_command,
        ]

    def failure(self, result: Result) -> str | None:
        """ssh's own one-line complaint when the connection itself failed."""
        if result.code != SSH_FAILED:
            return None
        return f"SSH to {self.target} failed: {result.last_lines(1, stderr=True) or result.last_lines(1) or 'ssh exited 255'}"


def quote(value: str | int | float | None) -> str:
    """A value for a sh script: quoted, or the empty string for None."""
    return shlex.quote("" if value is None else str(value))
