"""The `rbee` command: global options, the command tree, and the console-script entry point."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rbee import __version__
from rbee.cli import state
from rbee.cli.commands import daemons, down, infer, keys, load, models, status, up, workers
from rbee.cli.commands import doctor as doctor_command
from rbee.cli.context import Cli, ClientFactory, default_client
from rbee.cli.urls import check_queen_url
from rbee.clients.queen import DEFAULT_QUEEN_URL


def console(*, stderr: bool) -> Console:
    """A rich console; into a pipe or file, tables get room instead of wrapping at 80 columns."""
    found = Console(stderr=stderr)
    if found.is_terminal or "COLUMNS" in os.environ:
        return found
    return Console(stderr=stderr, width=200)


def print_version(value: bool) -> None:
    if value:
        print(f"rbee {__version__}")
        raise typer.Exit()


def read_token(token_file: Path | None) -> str | None:
    if token_file is None:
        return os.environ.get("RBEE_TOKEN") or None
    try:
        return token_file.read_text().strip() or None
    except OSError as exc:
        raise typer.BadParameter(
            f"{token_file}: {exc.strerror}", param_hint="--token-file"
        ) from None


def build_app(make_client: ClientFactory = default_client) -> typer.Typer:
    """The command tree. Tests pass a `make_client` that talks to an in-process queen."""
    app = typer.Typer(
        name="rbee",
        help="Run and watch an rbee cluster: one OpenAI-compatible API over your machines.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        queen_url: Annotated[
            str | None,
            typer.Option(
                envvar="RBEE_QUEEN_URL",
                help="Where the queen answers (default: the cluster `rbee up` runs here, else "
                f"{DEFAULT_QUEEN_URL}).",
                callback=check_queen_url,
                show_default=False,
            ),
        ] = None,
        cluster: Annotated[
            str | None,
            typer.Option(
                envvar="RBEE_CLUSTER",
                help="Which cluster started with `rbee up --name NAME` to talk to, when several "
                "run here.",
            ),
        ] = None,
        token_file: Annotated[
            Path | None,
            typer.Option(
                help="Read the cluster token or an API key from this file (default: env "
                "RBEE_TOKEN; never on the command line, where `ps` shows it).",
                dir_okay=False,
            ),
        ] = None,
        version: Annotated[
            bool,
            typer.Option(
                "--version", is_eager=True, callback=print_version, help="Print the version."
            ),
        ] = False,
    ) -> None:
        token = read_token(token_file)
        given_url = queen_url.rstrip("/") if queen_url else None
        target = state.choose(
            url=given_url,
            token=token,
            cluster=cluster,
            default_url=DEFAULT_QUEEN_URL,
            running=state.running_clusters(),
        )
        ctx.obj = Cli(
            queen_url=target.url.rstrip("/"),
            token=target.token,
            make_client=make_client,
            out=console(stderr=False),
            err=console(stderr=True),
            given_url=given_url,
            given_token=token,
            cluster=target.cluster,
            problem=target.problem,
        )

    up.register(app)
    doctor_command.register(app)
    down.register(app)
    status.register(app)
    infer.register(app)
    load.register(app)
    app.add_typer(models.app, name="model")
    app.add_typer(workers.app, name="worker")
    app.add_typer(keys.app, name="key")
    app.add_typer(daemons.queen_app, name="queen")
    app.add_typer(daemons.hive_app, name="hive")
    return app


def main() -> None:
    build_app()(prog_name="rbee")
