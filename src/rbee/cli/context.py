"""What every command shares: where the queen is, how to reach it, and how errors are told.

Errors become one line on stderr and exit code 1 (130 after Ctrl-C), never a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

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


@dataclass
class Cli:
    queen_url: str
    token: str | None
    make_client: ClientFactory
    out: Console
    err: Console

    def client(self) -> QueenClient:
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
        """Run a coroutine on a fresh event loop; failures become advice."""
        try:
            return asyncio.run(work())
        except CliError as exc:
            self.fail(str(exc), code=exc.exit_code)
        except (JobFailed, QueenError) as exc:
            self.fail(advice(exc, self.queen_url))
        except KeyboardInterrupt:
            self.fail("interrupted", code=130)


def cli_of(ctx: typer.Context) -> Cli:
    cli = ctx.find_object(Cli)
    if cli is None:  # pragma: no cover - the root callback always sets it
        raise RuntimeError("rbee's root callback did not run")
    return cli
