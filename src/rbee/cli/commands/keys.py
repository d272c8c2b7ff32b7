"""`rbee key create|list|revoke`: API keys for people and programs that only run inference."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from rbee.cli.context import cli_of
from rbee.cli.render import keys_table, to_json
from rbee.clients.queen import QueenClient
from rbee.contracts.keys import ApiKeyInfo, KeyCreate, KeyCreated

app = typer.Typer(
    help="API keys: inference only (chat, completions, models), revocable.", no_args_is_help=True
)
Name = Annotated[str, typer.Argument(metavar="NAME", help="The key's name, e.g. alice-laptop.")]


@app.command()
def create(
    ctx: typer.Context,
    name: Name,
    expires_days: Annotated[
        int | None, typer.Option(min=1, help="Days until the key stops working (default: never).")
    ] = None,
) -> None:
    """Create a key and print it, once, as the last line: it cannot be shown again."""
    cli = cli_of(ctx)
    try:
        KeyCreate(name=name, expires_days=expires_days)
    except ValidationError:
        cli.fail(f"{name!r} is not a valid key name: use letters, digits, '.', '_' and '-'", 2)

    async def work(client: QueenClient) -> KeyCreated:
        return await client.create_key(name, expires_days)

    created = cli.run(work)
    expires = f", expires {created.expires:%Y-%m-%d %H:%M} UTC" if created.expires else ""
    cli.err.print(
        f"API key {created.name} created{expires}. It is shown once; keep it safe:",
        markup=False,
        highlight=False,
    )
    print(created.key)


@app.command("list")
def list_keys(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Name, created, last used, requests and tokens served; never the secret."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> list[ApiKeyInfo]:
        return await client.keys()

    keys = cli.run(work)
    if as_json:
        print(to_json({"keys": keys}))
    elif keys:
        cli.out.print(keys_table(keys))
    else:
        cli.out.print("no API keys — create one with `rbee key create NAME`", markup=False)


@app.command()
def revoke(ctx: typer.Context, name: Name) -> None:
    """End a key at once: its next request is refused."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> None:
        await client.revoke_key(name)

    cli.run(work)
    cli.out.print(f"API key {name} revoked", markup=False, highlight=False)
