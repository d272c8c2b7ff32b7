"""`rbee hive install --ssh`, `rbee hive service [--ssh]`, `rbee queen service`: putting rbee on
a machine and keeping its daemons running across reboots."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

import httpx
import typer

from rbee.cli import install as installer
from rbee.cli import processes, services
from rbee.cli.commands import remote
from rbee.cli.context import Cli, cli_of
from rbee.cli.remote_hive import RemoteHive
from rbee.cli.ssh import Shell, Ssh
from rbee.cli.urls import check_queen_url
from rbee.common.tokens import is_loopback


def hive_install(
    ctx: typer.Context,
    ssh: Annotated[
        str,
        typer.Option(
            "--ssh", metavar="USER@HOST", help="The machine to install on (Python 3.11+ there)."
        ),
    ],
    cmake_args: Annotated[
        str | None,
        typer.Option(
            "--cmake-args",
            metavar="ARGS",
            help="CMake flags to compile llama.cpp with there (default: CUDA where it has a GPU "
            "and nvcc, Metal on macOS, else CPU; or its own CMAKE_ARGS).",
        ),
    ] = None,
) -> None:
    """Install this rbee on another machine (a virtual environment in ~/.local/share/rbee).

    Builds this checkout as a wheel, copies it over SSH and installs it with the pinned
    dependencies, and compiles llama.cpp's server there once (CUDA where that machine has a GPU
    and the CUDA toolkit). Running it again changes nothing."""
    cli = cli_of(ctx)
    shell = Ssh(remote.target_of(ssh))

    def say(line: str) -> None:
        cli.err.print(line, markup=False, highlight=False, soft_wrap=True)

    async def run() -> installer.Installed:
        with cli.err.status(f"installing rbee on {shell.where}…") as status:

            def on_line(line: str) -> None:
                if line.startswith("rbee: step "):
                    say(line.removeprefix("rbee: step "))
                elif line.strip() and not line.startswith("rbee: "):
                    cli.err.print(f"  {line}", style="dim", markup=False, highlight=False)
                    status.update(f"installing rbee on {shell.where}: {line.strip()[:80]}")

            return await installer.install(shell, say, on_line, cmake_args=cmake_args)

    done = cli.call(run)
    if done.outcome == "already-installed":
        cli.out.print(
            f"rbee is already installed on {shell.where} (same wheel, same lock; "
            f"llama.cpp build: {done.build})",
            markup=False,
        )
    else:
        cli.out.print(
            f"rbee is installed on {shell.where} in ~/.local/share/rbee/venv "
            f"(programs linked in ~/.local/bin; llama.cpp build: {done.build})",
            markup=False,
        )


def hive_service(
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
) -> None:
    """Run the hive (here, or on another machine with --ssh) as a systemd user service.

    Writes ~/.config/systemd/user/rbee-hive.service (the token goes to ~/.config/rbee/hive.env,
    mode 0600), then enables and starts it, so the hive comes back after a reboot."""
    cli = cli_of(ctx)
    target = remote.target_of(ssh) if ssh is not None else None
    shell: Shell = Ssh(target) if target is not None else Shell()
    host = host or ("0.0.0.0" if target else "127.0.0.1")
    if target is not None:
        hive_id = hive_id or RemoteHive(target).id
        advertise_host = advertise_host or target.host
    _need_token(cli, host, shell.where)
    if queen_url is not None:
        check_queen_url(queen_url)

    if target is None and remote_command is None:
        # Here, the hive is the one beside this rbee, as `rbee hive start` runs it (and as
        # `rbee queen service` finds the queen), whether or not its venv is on PATH.
        remote_command = processes.find_program("rbee-hive")

    async def run() -> list[str]:
        found = await services.resolve(shell, "rbee-hive", remote_command)
        url = queen_url or cli.queen_url
        parsed = httpx.URL(url)
        if queen_url is None and target is not None and is_loopback(parsed.host):
            client = found.get("client", "").strip("[]")
            url = str(parsed.copy_with(host=client)).rstrip("/")
        service = services.Service(
            name="rbee-hive",
            unit="rbee-hive.service",
            description=f"rbee-hive, reporting to the rbee queen at {url}",
            args=tuple(
                processes.hive_argv(
                    queen_url=url,
                    host=host,
                    port=port,
                    hive_id=hive_id,
                    advertise_host=advertise_host,
                    models_dir=models_dir,
                    worker_ports=worker_ports,
                    heartbeat_interval=heartbeat_interval,
                )
            ),
            env_file="hive.env",
        )
        return await services.install(shell, service, found["program"], cli.token)

    for note in cli.call(run):
        cli.out.print(note, markup=False, highlight=False)


def queen_service(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default: that of --queen-url).")
    ] = None,
) -> None:
    """Run the queen on this machine as a systemd user service (rbee-queen.service).

    The token goes to ~/.config/rbee/queen.env (mode 0600); the unit is enabled and started, so
    the queen comes back after a reboot."""
    cli = cli_of(ctx)
    _need_token(cli, host, "this machine")
    port = port or urlsplit(cli.queen_url).port or 7833
    service = services.Service(
        name="queen-rbee",
        unit="rbee-queen.service",
        description="queen-rbee, the rbee cluster's queen",
        args=("--host", host, "--port", str(port)),
        env_file="queen.env",
    )
    program = processes.find_program("queen-rbee")
    notes = cli.call(lambda: services.install(Shell(), service, program, cli.token))
    for note in notes:
        cli.out.print(note, markup=False, highlight=False)


def _need_token(cli: Cli, host: str, where: str) -> None:
    if not cli.token and not is_loopback(host):
        cli.fail(
            f"a daemon on {where} listening on {host} needs the cluster token: set RBEE_TOKEN "
            "(or --token-file)"
        )


def register(queen_app: typer.Typer, hive_app: typer.Typer) -> None:
    hive_app.command("install")(hive_install)
    hive_app.command("service")(hive_service)
    queen_app.command("service")(queen_service)
