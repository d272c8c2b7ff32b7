"""`rbee queen start|stop|status`, `rbee hive start|stop|status|logs`: one daemon in the
background (a hive on another machine with `--ssh`: see `remote`).

`start` runs it in its own session with its output in a log file under the state directory and
returns once `/health` answers; `stop` sends SIGTERM and waits (SIGKILL after the grace time);
`status` says up or down (exit 1 when down), with pid and URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Annotated
from urllib.parse import urlsplit

import psutil
import typer

from rbee.cli import processes, state
from rbee.cli.commands import remote, setup
from rbee.cli.context import Cli, CliError, cli_of
from rbee.cli.remote_hive import RemoteHive
from rbee.cli.urls import check_queen_url
from rbee.clients.hive import HiveClient, HiveError
from rbee.common.worker_command import SPAWN_MARKER, parse_flags, worker_command_flags

queen_app = typer.Typer(help="The queen daemon on this machine.", no_args_is_help=True)
hive_app = typer.Typer(
    help="The hive daemon on this machine, or on another one with --ssh.", no_args_is_help=True
)

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
        state.save_token(name, cli.token)  # for `rbee hive stop`, and commands finding the queen
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
    ssh: remote.SshOption = None,
    host: remote.HiveHostOption = None,
    port: remote.HivePortOption = 7835,
    hive_id: remote.HiveIdOption = None,
    advertise_host: remote.AdvertiseHostOption = None,
    remote_command: remote.RemoteCommandOption = None,
    queen_url: remote.HiveQueenUrlOption = None,
    models_dir: remote.ModelsDirOption = None,
    worker_ports: remote.WorkerPortsOption = None,
    heartbeat_interval: remote.HeartbeatIntervalOption = None,
    timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds to wait for it (to answer; with --ssh, to join)."),
    ] = 60,
) -> None:
    """Start a hive in the background, here or on another machine (--ssh), reporting to the queen.

    Over SSH the hive is detached, so it outlives the SSH session, and the command waits until
    it has joined the queen."""
    cli = cli_of(ctx)
    if ssh is not None:
        if queen_url is not None:
            check_queen_url(queen_url)
        hive = RemoteHive(
            target=remote.target_of(ssh),
            port=port,
            hive_id=hive_id,
            advertise_host=advertise_host,
            remote_command=remote_command,
            queen_url=queen_url,
            host=host or "0.0.0.0",
            worker_ports=worker_ports,
            models_dir=str(models_dir) if models_dir is not None else None,
            heartbeat_interval=heartbeat_interval,
        )
        remote.start(cli, hive, timeout)
        return
    host = host or "127.0.0.1"
    args = processes.hive_argv(
        queen_url=queen_url or cli.queen_url,
        host=host,
        port=port,
        hive_id=hive_id,
        advertise_host=advertise_host,
        models_dir=models_dir,
        worker_ports=worker_ports,
        heartbeat_interval=heartbeat_interval,
    )
    start_daemon(cli, "rbee-hive", args, processes.url_for(host, port), timeout)


HivePort = Annotated[int, typer.Option(min=1, max=65535, help="The hive's port.")]


def _hive_id_of(started: processes.Started) -> str | None:
    proc = started.process()
    if proc is None:
        return None
    try:
        return parse_flags(proc.cmdline()[1:]).get("--hive-id")
    except psutil.Error:
        return None


def _workers_by_marks(hive_id: str) -> list[psutil.Process]:
    """The hive's workers as the operating system shows them (their command line and the mark
    in their environment): for a hive that no longer answers."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        flags = worker_command_flags(proc.info.get("cmdline") or [])
        if flags is None or flags.get("--hive-id") != hive_id:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(SPAWN_MARKER) == hive_id:
                found.append(proc)
    return found


def stop_hive_workers(cli: Cli, started: processes.Started, keep: bool, timeout_s: float) -> None:
    """Before the hive here stops: its workers (and their engines) stop, through the hive's own
    API (it proves which are its own), or by their marks when it does not answer; with `keep`,
    they are named and left running."""
    token = cli.given_token or state.read_token("rbee-hive")

    async def through_api() -> list[str]:
        try:
            async with HiveClient(started.url, token=token, timeout=timeout_s + 15) as hive:
                workers = await hive.workers()
                if not keep:
                    await asyncio.gather(*(hive.stop_worker(w.pid) for w in workers))
        except HiveError as exc:
            raise CliError(f"the hive at {started.url} did not list its workers: {exc}") from None
        return [w.worker_id for w in workers]

    ids = cli.call(through_api)
    if keep:
        if ids:
            cli.out.print(
                f"left {len(ids)} worker(s) running: {', '.join(ids)} (--keep-workers; a hive "
                "started again finds them, `rbee worker stop ID` stops one)",
                markup=False,
            )
        return
    if ids:
        cli.out.print(f"stopped {len(ids)} worker(s): {', '.join(ids)}", markup=False)


def stop_workers_by_marks(cli: Cli, started: processes.Started, timeout_s: float) -> None:
    hive_id = _hive_id_of(started)
    leftovers = _workers_by_marks(hive_id) if hive_id else []
    for proc in leftovers:
        processes.terminate(proc, timeout_s)
    if leftovers:
        cli.out.print(f"stopped {len(leftovers)} worker process(es) directly", markup=False)


@hive_app.command("stop")
def hive_stop(
    ctx: typer.Context,
    ssh: remote.SshOption = None,
    port: HivePort = 7835,
    keep_workers: Annotated[
        bool,
        typer.Option(
            "--keep-workers",
            help="Leave its workers running (they keep serving; a hive started again finds them).",
        ),
    ] = False,
    workers: Annotated[
        bool, typer.Option("--workers", hidden=True, help="The default now: stop its workers.")
    ] = False,
    timeout: StopTimeout = 15,
) -> None:
    """Stop the hive started by `rbee hive start`, and its workers with their engines
    (--keep-workers leaves them running)."""
    cli = cli_of(ctx)
    if workers and keep_workers:
        cli.fail("--workers and --keep-workers say opposite things: choose one", code=2)
    if ssh is not None:
        remote.stop(cli, remote.target_of(ssh), port, not keep_workers, timeout)
        return
    running = state.load_running(state.pid_path("rbee-hive"))
    if running is not None:
        try:
            stop_hive_workers(cli, running[0], keep_workers, timeout)
        except typer.Exit:
            if keep_workers:
                raise
            # It does not answer: its workers are found by the marks it gave them.
            cli.err.print("rbee: stopping its workers by their marks instead", markup=False)
            stop_workers_by_marks(cli, running[0], timeout)
    stop_daemon(cli, "rbee-hive", timeout)


@hive_app.command("status")
def hive_status(ctx: typer.Context, ssh: remote.SshOption = None, port: HivePort = 7835) -> None:
    """Is the hive up (and, with --ssh, does the queen see it)? Exit code 1 when it is down."""
    cli = cli_of(ctx)
    if ssh is not None:
        remote.status(cli, remote.target_of(ssh), port)
        return
    daemon_status(cli, "rbee-hive", processes.url_for("127.0.0.1", port))


@hive_app.command("logs")
def hive_logs(
    ctx: typer.Context,
    ssh: remote.SshOption = None,
    port: HivePort = 7835,
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many lines.")] = 50,
) -> None:
    """The end of the hive's log (started by `rbee hive start`, here or with --ssh)."""
    cli = cli_of(ctx)
    if ssh is not None:
        remote.logs(cli, remote.target_of(ssh), port, lines)
        return
    path = state.log_path("rbee-hive")
    try:
        text = path.read_text(errors="replace")
    except OSError:
        cli.fail(f"no hive log at {path} (was the hive started with `rbee hive start`?)")
    print("\n".join(text.splitlines()[-lines:]))


setup.register(queen_app, hive_app)
