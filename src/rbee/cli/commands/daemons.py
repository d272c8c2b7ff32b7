"""`rbee queen start|stop|status`, `rbee hive start|stop|status`: one daemon in the background.

`start` runs it in its own session with its output in a log file under the state directory and
returns once `/health` answers; `stop` sends SIGTERM and waits (SIGKILL after the grace time);
`status` says up or down (exit 1 when down), with pid and URL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from rbee.cli import processes, state
from rbee.cli.context import Cli, CliError, cli_of

queen_app = typer.Typer(help="The queen daemon on this machine.", no_args_is_help=True)
hive_app = typer.Typer(help="The hive daemon on this machine.", no_args_is_help=True)

Host = Annotated[str, typer.Option(help="Address to listen on.")]
StartTimeout = Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait for it.")]
StopTimeout = Annotated[float, typer.Option("--timeout", min=1, help="Seconds before SIGKILL.")]


def daemon_env(token: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if token:
        env["RBEE_TOKEN"] = token
    return env


def start_daemon(cli: Cli, name: str, args: list[str], url: str, timeout_s: float) -> None:
    pid_file = state.pid_path(name)
    if running := state.load_running(pid_file):
        started = running[0]
        cli.out.print(
            f"{name} is already running (pid {started.pid}) at {started.url}", markup=False
        )
        return

    async def start() -> processes.Started:
        host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80
        if processes.port_in_use(host, port):
            who = (
                "an rbee daemon (`rbee up`?)" if await processes.answers(url) else "another program"
            )
            raise CliError(f"port {port} is already in use by {who} — pick another with --port")
        program = processes.find_program(name)
        started = processes.spawn(
            name, [program, *args], url=url, log=state.log_path(name), env=daemon_env(cli.token)
        )
        state.save(pid_file, started)
        try:
            await processes.wait_healthy(started, timeout_s)
        except CliError:
            await processes.stop(started, 5)
            pid_file.unlink(missing_ok=True)
            raise
        return started

    started = cli.call(start)
    cli.out.print(f"{name} started (pid {started.pid}) at {url} — log: {started.log}", markup=False)


def stop_daemon(cli: Cli, name: str, timeout_s: float) -> None:
    pid_file = state.pid_path(name)
    running = state.load_running(pid_file)
    if running is None:
        cli.out.print(
            f"{name} is not running (nothing started by `rbee {_short(name)} start`)", markup=False
        )
        return
    started = running[0]
    proc = started.process()
    graceful = proc is None or processes.terminate(proc, timeout_s)
    pid_file.unlink(missing_ok=True)
    how = "" if graceful else f" (killed: no exit {timeout_s:.0f}s after SIGTERM)"
    cli.out.print(f"{name} stopped (pid {started.pid}){how}", markup=False)


def daemon_status(cli: Cli, name: str, default_url: str) -> None:
    running = state.load_running(state.pid_path(name))
    if running is not None:
        started = running[0]
        health = (
            "answering" if cli.call(lambda: processes.answers(started.url)) else "not answering"
        )
        cli.out.print(
            f"{name}: up (pid {started.pid}) at {started.url}, {health} — log: {started.log}",
            markup=False,
        )
        return
    if cli.call(lambda: processes.answers(default_url)):
        cli.out.print(
            f"{name}: up at {default_url} (not started by `rbee {_short(name)} start`)",
            markup=False,
        )
        return
    cli.out.print(f"{name}: down (nothing answers at {default_url})", markup=False)
    raise typer.Exit(1)


def _short(name: str) -> str:
    return "queen" if name == "queen-rbee" else "hive"


def _queen_port(cli: Cli) -> int:
    return urlsplit(cli.queen_url).port or 7833


@queen_app.command("start")
def queen_start(
    ctx: typer.Context,
    host: Host = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: that of --queen-url).")] = None,
    heartbeat_timeout: Annotated[
        float | None, typer.Option(help="Seconds of silence before a worker is offline.")
    ] = None,
    timeout: StartTimeout = 30,
) -> None:
    """Start the queen in the background on this machine."""
    cli = cli_of(ctx)
    port = port or _queen_port(cli)
    args = ["--host", host, "--port", str(port)]
    if heartbeat_timeout is not None:
        args += ["--heartbeat-timeout", str(heartbeat_timeout)]
    start_daemon(cli, "queen-rbee", args, processes.url_for(host, port), timeout)


@queen_app.command("stop")
def queen_stop(ctx: typer.Context, timeout: StopTimeout = 15) -> None:
    """Stop the queen started by `rbee queen start`."""
    stop_daemon(cli_of(ctx), "queen-rbee", timeout)


@queen_app.command("status")
def queen_status(ctx: typer.Context) -> None:
    """Is the queen up? Exit code 1 when it is down."""
    cli = cli_of(ctx)
    daemon_status(cli, "queen-rbee", cli.queen_url)


@hive_app.command("start")
def hive_start(
    ctx: typer.Context,
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7835,
    hive_id: Annotated[str | None, typer.Option(help="Hive id (default: the hive's own).")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Where model files live.")] = None,
    worker_ports: Annotated[
        str | None, typer.Option(help="Port range for workers, e.g. 8080-8999.")
    ] = None,
    heartbeat_interval: Annotated[
        float | None, typer.Option(help="Seconds between heartbeats.")
    ] = None,
    timeout: StartTimeout = 30,
) -> None:
    """Start this machine's hive in the background, reporting to --queen-url."""
    cli = cli_of(ctx)
    args = ["--queen-url", cli.queen_url, "--host", host, "--port", str(port)]
    for flag, value in (
        ("--hive-id", hive_id),
        ("--models-dir", models_dir),
        ("--worker-ports", worker_ports),
        ("--heartbeat-interval", heartbeat_interval),
    ):
        if value is not None:
            args += [flag, str(value)]
    start_daemon(cli, "rbee-hive", args, processes.url_for(host, port), timeout)


@hive_app.command("stop")
def hive_stop(ctx: typer.Context, timeout: StopTimeout = 15) -> None:
    """Stop the hive started by `rbee hive start` (its workers keep running)."""
    stop_daemon(cli_of(ctx), "rbee-hive", timeout)


@hive_app.command("status")
def hive_status(
    ctx: typer.Context, port: Annotated[int, typer.Option(help="Port to check.")] = 7835
) -> None:
    """Is this machine's hive up? Exit code 1 when it is down."""
    daemon_status(cli_of(ctx), "rbee-hive", processes.url_for("127.0.0.1", port))
