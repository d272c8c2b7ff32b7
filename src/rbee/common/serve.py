"""Run a FastAPI app under uvicorn the way every rbee daemon should.

SIGTERM and SIGINT shut down gracefully and the process exits 0 (uvicorn alone re-raises the
signal after shutdown, which would report death-by-signal). A taken port or a bad setting is a
one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, CliSettingsSource, SettingsError

from rbee import __version__
from rbee.common import net
from rbee.common.auth import openapi_url
from rbee.common.errors import install_error_handlers
from rbee.common.settings import DaemonSettings

S = TypeVar("S", bound=BaseSettings)

# A request allocates thousands of short-lived objects, nearly all freed by reference counting
# before any collection; with the default threshold (700) the youngest generation was still
# collected several times per proxied request.
GC_YOUNG_THRESHOLD = 20_000
# How often a stopping daemon looks whether its connections have closed (uvicorn: 0.1 s).
SETTLE_POLL_S = 0.005


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


@functools.cache
def flags_parser(cls: type[BaseSettings]) -> CliSettingsSource[Any]:
    """The parser of a settings class's flags, built once per process: building it takes
    longer than parsing with it (~10 ms against ~6 for a worker's), and a standby worker builds
    its own before it is handed its flags."""
    return CliSettingsSource(cls)


def parse_settings(cls: type[S], prog: str, argv: list[str] | None = None) -> S:
    """Flags and environment parsed by the settings class itself: each option is written once."""
    args = sys.argv[1:] if argv is None else argv
    if any(arg == "--token" or arg.startswith("--token=") for arg in args):
        # Anything on a command line is readable by every user of the machine (`ps`).
        fail(
            prog,
            "a token is never taken from the command line: set RBEE_TOKEN or use --token-file PATH",
            code=2,
        )
    try:
        return CliApp.run(cls, cli_args=args, cli_settings_source=flags_parser(cls))
    except SettingsError as exc:  # a flag's value its parser cannot split, e.g. `a,b=1`
        field, _, why = str(exc).removeprefix("Parsing error encountered for ").partition(": ")
        hint = (
            ": give MODEL=VALUE, or a JSON object such as '{\"MODEL\": VALUE}' for an id with "
            "',' or '='"
            if field.startswith("model_")
            else f" ({why})"
        )
        fail(prog, f"--{field.replace('_', '-')}: cannot read its value{hint}", code=2)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "-".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        fail(prog, f"--{where.replace('_', '-')}: {message}" if where else message, code=2)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Same as uvicorn's, minus remembering the signal to re-raise it after shutdown.
        first = not self.should_exit
        if self.should_exit and sig == 2:
            self.force_exit = True
        else:
            self.should_exit = True
        if first and self._on_signal is not None:
            self._on_signal()
        if self._ticked is not None:  # the main loop sees it now, not at its next tick
            self._ticked[0].call_soon_threadsafe(self._ticked[1].set)

    _ticked: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    async def main_loop(self) -> None:
        # uvicorn's, woken by a stop signal instead of finding it up to 0.1 s later: a worker
        # stopped to make room for another model gives its memory back that much sooner.
        wake = asyncio.Event()
        self._ticked = (asyncio.get_running_loop(), wake)
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await wake.wait()
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's, with its fixed 0.1 s pause after asking connections to close and its
        # 0.1 s polls replaced by short ones: an idle worker stopped to make room for another
        # model ends (and gives its memory back) as soon as its connections have closed.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                await self._settle()
        except TimeoutError:
            logging.getLogger("uvicorn.error").error(
                "Cancel %s running task(s), timeout graceful shutdown exceeded",
                len(self.server_state.tasks),
            )
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _settle(self) -> None:
        """Until the connections have closed and the requests' tasks ended (a second Ctrl-C
        stops waiting): uvicorn's server state has no event to wait on."""
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(SETTLE_POLL_S)
        for server in self.servers:
            await server.wait_closed()


def bind_socket(prog: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it every small response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit these: a client whose machine vanished is dropped within
    # seconds, so a worker stops generating for it instead of holding its slot for minutes.
    net.apply(sock)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "is already in use" if exc.errno == 98 else f"cannot be opened ({exc.strerror})"
        fail(prog, f"{host}:{port} {reason}")
    # Not inheritable (Python's default, kept): no child a daemon starts may hold its port.
    return sock


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def daemon_app(title: str, settings: DaemonSettings, lifespan: Lifespan) -> FastAPI:
    """What every rbee daemon's app starts as: its name and version, the lifespan that owns its
    background work, API docs only where no token guards it, the body size limit, and errors
    in OpenAI's shape. Each daemon adds its routes, then its gate."""
    app = FastAPI(
        title=title,
        version=__version__,
        lifespan=lifespan,
        openapi_url=openapi_url(settings.token),
        max_body_size=settings.max_body_bytes,
    )
    install_error_handlers(app)
    return app


def serve(
    app: FastAPI,
    *,
    prog: str,
    host: str,
    port: int,
    graceful_s: int = 5,
    on_signal: Callable[[], None] | None = None,
    log_level: str = "warning",
    tls: tuple[Path, Path] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0 after a clean shutdown)."""
    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    sock = bind_socket(prog, host, port)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_s,
        access_log=False,
        lifespan="on",
        # Both are dependencies: uvloop's transports cost a fraction of asyncio's on every
        # socket write, which the queen makes twice per proxied request.
        loop="uvloop",
        http="httptools",
        # HTTPS when given a certificate and its key; clients trust its CA via SSL_CERT_FILE.
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
    )
    server = _Server(config, on_signal)
    # Everything built so far (modules, the app and its routes and models) lives as long as the
    # process. Frozen, the cyclic garbage collector stops walking it again and again: measured
    # on the queen's proxy path, those walks were about a fifth of its CPU.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    try:
        # run() (not asyncio.run(serve())) so the loop comes from config.loop.
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits this way when the app's startup fails
        return int(exc.code or 1)
    finally:
        sock.close()
    return 0 if server.started else 1
