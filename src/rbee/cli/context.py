"""What every command shares: where the queen is, how to reach it, and how errors are told.

Errors become one line on stderr and exit code 1 (130 after Ctrl-C), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from rbee.clients.queen import (
    JobFailed,
    QueenClient,
    QueenError,
    QueenHTTPError,
    QueenUnreachable,
)
from rbee.contracts.workers import check_device_id

T = TypeVar("T")
ClientFactory = Callable[[str, str | None], QueenClient]
# How long a command may tidy up after Ctrl-C (cancel its job on the queen, stop an ssh) before
# it is ended regardless.
INTERRUPT_GRACE_S = 3.0


class CliError(Exception):
    """A failure the user can act on; its message is the whole story."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def device_option(value: str | None) -> str | None:
    """A malformed `--device` is a usage error before anything is asked of the queen."""
    if value is None:
        return None
    try:
        return check_device_id(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def default_client(url: str, token: str | None) -> QueenClient:
    return QueenClient(url, token=token)


def advice(exc: BaseException, queen_url: str) -> str:
    """The one line a person reads when a command fails."""
    if isinstance(exc, QueenUnreachable):
        return f"queen is not running at {exc.url} — start it with `rbee queen start` or `rbee up`"
    if isinstance(exc, QueenHTTPError) and exc.status == 401:
        return f"the queen at {queen_url} refused the token — set RBEE_TOKEN or pass --token-file"
    if isinstance(exc, QueenHTTPError) and exc.status == 403:
        return f"the queen said: {exc} (HTTP 403: this needs the cluster token, not an API key)"
    if isinstance(exc, QueenHTTPError) and exc.status >= 400:
        return f"the queen said: {exc} (HTTP {exc.status})"
    if isinstance(exc, QueenHTTPError):  # an error event inside an answer already streaming
        return f"the answer broke off: {exc}"
    return str(exc)


def _write_line(stream: IO[str], text: str) -> bool:
    """False when the stream is closed or broken: a pipe whose reader left (`| head -1`, a
    `tee` stopped by the same Ctrl-C), or a terminal that hung up."""
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):  # ValueError: the file object itself was closed
        _discard(stream)
        return False
    return True


def _discard(stream: IO[str]) -> None:
    """Point a dead standard stream at /dev/null, so that what is still buffered in it does not
    fail again when the interpreter flushes it at exit ("Exception ignored … BrokenPipeError")."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


@dataclass
class Cli:
    queen_url: str
    token: str | None
    make_client: ClientFactory
    out: Console
    err: Console
    out_gone: bool = field(default=False, repr=False)
    # What the user gave (flags, environment), before a running cluster filled the gaps: `rbee
    # up` starts its cluster with the token given, never with another cluster's.
    given_url: str | None = None
    given_token: str | None = None
    cluster: str | None = None  # the name of the cluster found (or asked for with --cluster)
    problem: str | None = None  # why no queen can be chosen (several clusters run): said on use

    def say(self, line: str) -> None:
        """One plain line (or block) for the person running a long command (`rbee up`). On
        stdout while it can be written, then on stderr; never raises, since rich would stop the
        program on a broken pipe, and losing the audience must never skip the cleanup."""
        if not self.out_gone:
            if _write_line(self.out.file, line):
                return
            self.out_gone = True
            self.warn("standard output is closed; messages go to standard error from now on")
        _write_line(self.err.file, line)

    def warn(self, message: str) -> None:
        """`rbee: message` on stderr, or nowhere once stderr is gone too; never raises."""
        _write_line(self.err.file, f"rbee: {message}")

    def client(self) -> QueenClient:
        if self.problem is not None:
            raise CliError(self.problem)
        return self.make_client(self.queen_url, self.token)

    def fail(self, message: str, code: int = 1) -> NoReturn:
        self.err.print(f"rbee: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code)

    def run(self, work: Callable[[QueenClient], Awaitable[T]]) -> T:
        """Run `work` with a fresh client on a fresh event loop; failures become advice."""

        async def with_client() -> T:
            async with self.client() as client:
                return await work(client)

        return self.call(with_client)

    def call(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on a fresh event loop; failures become advice, Ctrl-C exit 130."""
        try:
            return run_interruptible(work)
        except CliError as exc:
            self.fail(str(exc), code=exc.exit_code)
        except (JobFailed, QueenError) as exc:
            self.fail(advice(exc, self.queen_url))
        except (KeyboardInterrupt, asyncio.CancelledError):
            self.fail("interrupted", code=130)


class _Interrupt:
    """Ctrl-C for a command on an event loop. The first cancels the command's task, so it can
    tidy up (a job it started is cancelled on the queen); should the task not end within
    INTERRUPT_GRACE_S, or a second Ctrl-C come, the process ends at once with 130. asyncio's own
    handling only cancels once and then waits for as long as the task runs: a library that turns
    the cancellation into an error (httpx raises ConnectError for a connect cut short) inside a
    loop that retries on errors, or a cleanup stuck on the network, kept `rbee` running."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: threading.Timer | None = None

    def watch(self, task: asyncio.Task[Any]) -> None:
        self._task, self._loop = task, task.get_loop()

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.count > 1 or self._task is None or self._loop is None:
            _exit_interrupted()
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._timer = threading.Timer(INTERRUPT_GRACE_S, _exit_interrupted)
        self._timer.daemon = True
        self._timer.start()

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _exit_interrupted() -> NoReturn:
    """The last resort, from any thread: one line on stderr and exit 130, now."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(2, b"rbee: interrupted\n")
    os._exit(130)


def run_interruptible(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(work())`, with Ctrl-C as `_Interrupt` handles it: the task cancelled (the
    caller sees CancelledError, or whatever the work made of it), and an exit at once if that
    does not end it. A Ctrl-C that the shell asked us to ignore stays ignored."""
    interrupt = _Interrupt()

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        interrupt.watch(task)
        return await work()

    try:
        previous = signal.getsignal(signal.SIGINT) or signal.SIG_DFL
        if previous is signal.SIG_IGN:
            return asyncio.run(work())
        signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread: no signals here
        return asyncio.run(work())
    try:
        return asyncio.run(main())
    finally:
        interrupt.done()
        signal.signal(signal.SIGINT, previous)


def cli_of(ctx: typer.Context) -> Cli:
    cli = ctx.find_object(Cli)
    if cli is None:  # pragma: no cover - the root callback always sets it
        raise RuntimeError("rbee's root callback did not run")
    return cli
