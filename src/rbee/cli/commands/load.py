"""`rbee load`, `rbee unload`: load and unload models by hand, through the queen's jobs API."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rbee.cli import jobs
from rbee.cli.context import cli_of
from rbee.cli.render import human_bytes
from rbee.clients.queen import QueenClient
from rbee.contracts.jobs import ModelLoadJob, ModelUnloadJob
from rbee.contracts.workers import keep_alive_wire, parse_keep_alive


def load(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model id, as `rbee models`.")],
    hive: Annotated[
        str | None,
        typer.Option("--hive", help="Hive id (default: where the queen would start it on demand)."),
    ] = None,
    keep_alive: Annotated[
        str | None,
        typer.Option(
            "--keep-alive",
            metavar="DURATION",
            help="Unload it once idle this long, e.g. 30s, 10m, 1h (default: pinned, never "
            "unloaded for idleness, as `rbee worker spawn`).",
        ),
    ] = None,
    ctx_size: Annotated[
        int | None,
        typer.Option(
            "--ctx-size",
            min=16,
            max=1 << 20,
            help="Tokens of context per slot (default: the queen's for the model, else the "
            "model's trained context as far as memory allows).",
        ),
    ] = None,
    slots: Annotated[
        int | None,
        typer.Option(
            "--slots",
            min=1,
            max=64,
            help="Requests served at once (default: 2 where memory allows).",
        ),
    ] = None,
) -> None:
    """Load a model: start a worker for it and follow its progress until it is ready (bounded
    by the queen's load deadline, which grows with the model's size)."""
    cli = cli_of(ctx)
    try:
        keep_alive_s = None if keep_alive is None else keep_alive_wire(parse_keep_alive(keep_alive))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--keep-alive") from None
    request = ModelLoadJob(
        operation="model_load",
        model=model,
        hive_id=hive,
        keep_alive=keep_alive_s,
        ctx_size=ctx_size,
        slots=slots,
    )

    async def work(client: QueenClient) -> dict[str, Any]:
        return await jobs.run_job(client, request, cli.err)

    result = cli.run(work)
    parts = [p for p in result.get("parts") or [] if isinstance(p, dict)]
    if parts:  # it fits on no single device: one worker split over several hives
        hives = "+".join(dict.fromkeys(str(p.get("hive_id")) for p in parts))
        where = f"split over hives {hives} ({', '.join(part_text(p) for p in parts)}"
    else:
        where = f"on hive {result.get('hive_id')} ({result.get('device')}"
    cli.out.print(
        f"loaded {model}: worker {result.get('worker_id')} {where}, "
        f"{result.get('ctx_size')} tokens x {result.get('slots')} slot(s))",
        markup=False,
        highlight=False,
    )


def part_text(part: dict[str, Any]) -> str:
    """One part of a split worker: `hive device size`."""
    size = part.get("bytes")
    shown = human_bytes(size if isinstance(size, int) else None)
    return f"{part.get('hive_id')} {part.get('device')} {shown}"


def unload(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model id, as `rbee models`.")],
    now: Annotated[
        bool,
        typer.Option(
            "--now",
            help="Cut the requests in flight (each client gets a 503 worker_stopping error) "
            "instead of letting them finish.",
        ),
    ] = False,
) -> None:
    """Unload a model: no new request goes to its workers, those in flight finish (unless
    --now), then its workers stop and their memory is free again."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> dict[str, Any]:
        request = ModelUnloadJob(operation="model_unload", model=model, now=now)
        return await jobs.run_job(client, request, cli.err)

    result = cli.run(work)
    stopped = [w.get("worker_id") for w in result.get("workers", []) if isinstance(w, dict)]
    cli.out.print(
        f"unloaded {model}: stopped {', '.join(str(w) for w in stopped) or 'no worker'}",
        markup=False,
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(load)
    app.command()(unload)
