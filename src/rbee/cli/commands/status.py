"""`rbee status`, `rbee models`: what the cluster is and what it serves."""

from __future__ import annotations

from typing import Annotated

import typer

from rbee.cli.context import cli_of
from rbee.cli.render import backoff_lines, hives_table, models_table, to_json, workers_table
from rbee.cli.watch import watch
from rbee.clients.queen import ModelEntry, QueenClient
from rbee.contracts.events import ModelEvent
from rbee.contracts.hives import HiveView
from rbee.contracts.workers import WorkerView

EVENTS_SHOWN = 8

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


WatchFlag = Annotated[
    bool, typer.Option("--watch", "-w", help="Keep the view open and update it live (Ctrl-C ends).")
]


def status(ctx: typer.Context, as_json: JsonFlag = False, live: WatchFlag = False) -> None:
    """Hives and workers of the cluster: model, status, load, address, last seen."""
    cli = cli_of(ctx)
    if live:
        if as_json:
            cli.fail("--watch and --json do not go together", code=2)
        cli.run(lambda client: watch(cli, client))  # until Ctrl-C
        return

    async def fetch(
        client: QueenClient,
    ) -> tuple[list[HiveView], list[WorkerView], list[ModelEvent]]:
        await client.health()
        return await client.hives(), await client.workers(), await client.model_events()

    hives, workers, events = cli.run(fetch)
    if as_json:
        document = {"queen_url": cli.queen_url, "hives": hives, "workers": workers}
        print(to_json({**document, "model_events": events}))
        return
    ready = sum(1 for w in workers if w.available)
    cli.out.print(
        f"queen {cli.queen_url}: {len(hives)} hive(s), {len(workers)} worker(s), {ready} ready",
        markup=False,
        highlight=False,
    )
    if hives:
        cli.out.print()
        cli.out.print(hives_table(hives))
    cli.out.print()
    if workers:
        cli.out.print(workers_table(workers))
    else:
        cli.out.print("no workers yet — start one with `rbee worker spawn -m MODEL`", markup=False)
    if events:
        cli.out.print()
        cli.out.print("recent model loads and unloads:", markup=False, highlight=False)
        for event in events[-EVENTS_SHOWN:]:
            cli.out.print(f"  {event_line(event)}", markup=False, highlight=False)


def event_line(event: ModelEvent) -> str:
    """`12:01:33  unloaded  gemma-3-270m  (evicted)  worker h1-8081 on h1`"""
    when = event.at[11:19] if len(event.at) >= 19 else event.at
    where = f" on {event.hive_id}" if event.hive_id else ""
    return (
        f"{when}  {event.change:<8}  {event.model}  ({event.reason})  "
        f"worker {event.worker_id}{where}"
    )


def models(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """What the cluster serves (loaded) and what its hives could start (available)."""
    cli = cli_of(ctx)

    async def fetch(client: QueenClient) -> list[ModelEntry]:
        return await client.models()

    entries = cli.run(fetch)
    if as_json:
        print(to_json({"models": entries}))
    elif entries:
        cli.out.print(models_table(entries))
        for line in backoff_lines(entries):
            cli.out.print(line, markup=False, highlight=False)
    else:
        cli.out.print(
            "the cluster has no models: no worker serves one and no hive has one — "
            "`rbee model download REF` fetches one",
            markup=False,
        )


def register(app: typer.Typer) -> None:
    app.command()(status)
    app.command()(models)
