"""Ctrl-C ends every `rbee` command at once (exit 130), whatever its network calls are doing."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
import textwrap

import httpx
from rich.console import Console

from rbee.cli.context import Cli
from rbee.cli.watch import watch
from rbee.clients.queen import QueenClient

# A command whose work treats the cancellation as one more error to retry after, as a loop
# around a network library that turns it into its own error does.
STUBBORN = textwrap.dedent(
    """
    import asyncio, sys
    import typer
    from rich.console import Console
    from rbee.cli.context import Cli

    async def stubborn() -> None:
        print("working", flush=True)
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # "the connection failed": try again

    cli = Cli("http://127.0.0.1:9", None, None, Console(), Console(stderr=True))
    try:
        cli.call(stubborn)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    """
)


def test_ctrl_c_ends_a_command_that_keeps_going_after_its_cancellation() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "working\n"  # its loop runs and Ctrl-C is handled
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)  # a few seconds; generous for a busy machine
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert code == 130
    assert "rbee: interrupted" in err


async def test_the_watcher_stops_when_its_cancelled_connect_ends_as_an_error() -> None:
    """httpx raises ConnectError, not CancelledError, for a connect cut short by a cancel
    (encode/httpx#2381): the watcher must not take that for a lost queen and go on."""
    connecting = asyncio.Event()
    converted: list[str] = []

    async def queen(request: httpx.Request) -> httpx.Response:
        connecting.set()
        try:
            await asyncio.Event().wait()  # the connect hangs
        except asyncio.CancelledError:
            if converted:  # once is enough to show it (and lets the old watcher be stopped)
                raise
            converted.append(request.url.path)
            raise httpx.ConnectError("All connection attempts failed", request=request) from None
        raise AssertionError("unreachable")  # pragma: no cover

    out = Console(file=io.StringIO(), width=120)
    cli = Cli("http://127.0.0.1:9", None, lambda url, token: QueenClient(url), out, out)
    async with QueenClient(transport=httpx.MockTransport(queen)) as client:
        task = asyncio.create_task(watch(cli, client))
        await connecting.wait()
        connecting.clear()
        task.cancel()  # what Ctrl-C does to the command's task
        done, _ = await asyncio.wait({task}, timeout=30)
        if not done:
            task.cancel()  # the old watcher: stop it for good before failing
            await asyncio.gather(task, return_exceptions=True)
    assert converted, "the cancel reached the connect"
    assert done, "the watcher went on after Ctrl-C"
    assert task.cancelled()
