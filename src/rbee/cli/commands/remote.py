"""`rbee hive start|stop|status|logs --ssh USER@HOST`: a hive on another machine, from here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rbee.cli import remote_hive
from rbee.cli.context import Cli, CliError
from rbee.cli.remote_hive import RemoteHive
from rbee.cli.ssh import Ssh, SshTarget
from rbee.clients.hive import HiveError
from rbee.common.tokens import is_loopback


def parse_target(value: str | None) -> SshTarget | None:
    """Typer callback for `--ssh`: a malformed target is a usage error."""
    if value is None:
        return None
    try:
        return SshTarget.parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


SshOption = Annotated[
    str | None,
    typer.Option(
        "--ssh",
        metavar="USER@HOST",
        help="Act on the hive of that machine over SSH (RBEE_SSH_COMMAND replaces `ssh`).",
    ),
]

# The options `rbee hive start` and `rbee hive service` share: one hive, here or over SSH.
HiveHostOption = Annotated[
    str | None,
    typer.Option(help="Address to listen on (default: 127.0.0.1; 0.0.0.0 with --ssh)."),
]
HivePortOption = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]
HiveIdOption = Annotated[
    str | None,
    typer.Option(help="Hive id (default: the hive's own; with --ssh, the HOST part)."),
]
AdvertiseHostOption = Annotated[
    str | None,
    typer.Option(help="How the queen reaches the hive (with --ssh, default: the HOST part)."),
]
RemoteCommandOption = Annotated[
    str | None,
    typer.Option(
        help="With --ssh: the remote rbee-hive (default: on PATH, else ~/.local/bin/rbee-hive)."
    ),
]
HiveQueenUrlOption = Annotated[
    str | None,
    typer.Option(
        "--queen-url",
        help="The queen's URL as the hive's machine reaches it (default: the CLI's; with --ssh "
        "and a loopback URL, the address that machine sees this one's SSH connection come from).",
    ),
]

ModelsDirOption = Annotated[Path | None, typer.Option(help="Where model files live.")]
WorkerPortsOption = Annotated[
    str | None, typer.Option(help="Port range for workers, e.g. 8080-8999.")
]
HeartbeatIntervalOption = Annotated[float | None, typer.Option(help="Seconds between heartbeats.")]


def target_of(value: str) -> SshTarget:
    target = parse_target(value)
    assert target is not None
    return target


def start(cli: Cli, hive: RemoteHive, timeout_s: float) -> None:
    if not cli.token and not is_loopback(hive.host):
        cli.fail(
            f"a hive on {hive.target} listens on {hive.host}, which needs the cluster token: "
            "set RBEE_TOKEN (or --token-file)"
        )
    ssh = Ssh(hive.target)

    async def run() -> remote_hive.Started:
        started = await remote_hive.start(ssh, hive, cli.queen_url, cli.token)
        cli.err.print(
            f"rbee-hive {'already runs' if started.already else 'started'} on {hive.target} "
            f"(pid {started.pid}), reporting to {started.queen_url}; waiting for it to join…",
            markup=False,
            highlight=False,
        )
        async with cli.client() as queen:
            await remote_hive.wait_joined(ssh, hive, queen, started, timeout_s)
        return started

    started = cli.call(run)
    cli.out.print(
        f"hive {hive.id} is up on {hive.target} (pid {started.pid}) at {hive.url} "
        f"and has joined the queen at {cli.queen_url}",
        markup=False,
        highlight=False,
    )


def stop(cli: Cli, target: SshTarget, port: int, workers: bool, grace_s: float) -> None:
    ssh = Ssh(target)

    async def run() -> tuple[str, list[int]]:
        stopped_workers: list[int] = []
        if workers:
            record = await remote_hive.status(ssh, port)
            if record.get("state") == "running" and record.get("url"):
                try:
                    stopped_workers = await remote_hive.stop_workers(record["url"], cli.token)
                except HiveError as exc:
                    raise CliError(
                        f"could not stop the workers of the hive on {target}: {exc}"
                    ) from None
        return await remote_hive.stop(ssh, port, grace_s), stopped_workers

    state, stopped_workers = cli.call(run)
    if workers:
        cli.out.print(f"stopped {len(stopped_workers)} worker(s) on {target}", markup=False)
    if state == "not-running":
        cli.out.print(f"rbee-hive on {target} (port {port}) is not running", markup=False)
    else:
        how = " (killed: no exit after SIGTERM)" if state == "killed" else ""
        cli.out.print(f"rbee-hive on {target} (port {port}) stopped{how}", markup=False)


def status(cli: Cli, target: SshTarget, port: int) -> None:
    ssh = Ssh(target)

    async def run() -> tuple[dict[str, str], bool | None]:
        record = await remote_hive.status(ssh, port)
        seen = None
        if record.get("hive_id"):
            async with cli.client() as queen:
                seen = await remote_hive.queen_sees(queen, record["hive_id"])
        return record, seen

    record, seen = cli.call(run)
    if record.get("state") != "running":
        cli.out.print(f"rbee-hive on {target} (port {port}): not running", markup=False)
        raise typer.Exit(1)
    queen = {
        True: f"the queen at {cli.queen_url} sees it",
        False: f"the queen at {cli.queen_url} does not see it",
        None: f"no queen answers at {cli.queen_url}",
    }[seen]
    cli.out.print(
        f"rbee-hive on {target}: running (pid {record.get('pid')}) as hive "
        f"{record.get('hive_id')} at {record.get('url')}, reporting to {record.get('queen_url')}; "
        f"{queen}",
        markup=False,
        highlight=False,
    )


def logs(cli: Cli, target: SshTarget, port: int, lines: int) -> None:
    text = cli.call(lambda: remote_hive.logs(Ssh(target), port, lines))
    print(text, end="" if text.endswith("\n") else "\n")
