"""`rbee worker spawn|list|stop`: worker processes, through the queen's jobs API."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from rbee.cli import jobs
from rbee.cli.context import cli_of, device_option
from rbee.cli.render import context_text, to_json, workers_table
from rbee.clients.queen import QueenClient
from rbee.contracts.jobs import WorkerSpawnJob, WorkerStopJob
from rbee.contracts.workers import KvCacheType, WorkerView, keep_alive_wire, parse_keep_alive

app = typer.Typer(help="Worker processes: start, list, stop, logs.", no_args_is_help=True)


@app.command()
def spawn(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("-m", "--model", help="Model id to serve.")],
    hive: Annotated[
        str | None,
        typer.Option("--hive", help="Hive id (default: the queen picks the one with most memory)."),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            callback=device_option,
            help="Device: cpu:0, cuda:N or metal:0 (default: the queen picks the GPU or CPU "
            "with room for the model).",
        ),
    ] = None,
    slots: Annotated[
        int | None,
        typer.Option(
            min=1, max=64, help="Requests served at once (default: 2 where memory allows)."
        ),
    ] = None,
    ctx_size: Annotated[
        int | None,
        typer.Option(
            "--ctx-size",
            min=16,
            max=1 << 20,
            help="Tokens of context per slot (default: the model's trained context, up to 8192 "
            "on a CPU and 32768 on a GPU, as far as the device's memory allows).",
        ),
    ] = None,
    embedding: Annotated[
        bool, typer.Option("--embedding", help="Serve POST /v1/embeddings for the model.")
    ] = False,
    rerank: Annotated[
        bool,
        typer.Option(
            "--rerank",
            help="Serve POST /v1/rerank (a reranker model starts so by itself).",
        ),
    ] = False,
    cores: Annotated[
        int | None,
        typer.Option(
            min=1, help="CPU cores of its own (default: an even share of the hive's free cores)."
        ),
    ] = None,
    gpu_layers: Annotated[
        int | None,
        typer.Option(min=0, help="Layers to offload to the GPU (default: all of them)."),
    ] = None,
    kv_cache_type: Annotated[
        KvCacheType,
        typer.Option(
            "--kv-cache-type",
            help="How it stores its KV cache: q8_0 (half the memory of f16), f16, or auto "
            "(q8_0 with several slots, f16 with one). A model that cannot take q8_0 keeps f16.",
        ),
    ] = "auto",
    keep_alive: Annotated[
        str | None,
        typer.Option(
            "--keep-alive",
            metavar="DURATION",
            help="Unload it once idle this long, e.g. 30s, 10m, 1h (default: pinned, never "
            "unloaded for idleness).",
        ),
    ] = None,
) -> None:
    """Start a worker for a model on a hive; returns once it is ready (the queen's spawn job
    waits for that, bounded by the queen's --spawn-timeout)."""
    cli = cli_of(ctx)
    try:
        keep_alive_s = None if keep_alive is None else keep_alive_wire(parse_keep_alive(keep_alive))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--keep-alive") from None
    request = WorkerSpawnJob(
        operation="worker_spawn",
        model=model,
        hive_id=hive,
        device=device,
        slots=slots,
        ctx_size=ctx_size,
        embedding=embedding or None,
        rerank=rerank or None,
        cores=cores,
        gpu_layers=gpu_layers,
        kv_cache_type=kv_cache_type,
        keep_alive=keep_alive_s,
    )

    async def work(client: QueenClient) -> WorkerView:
        pulled = await jobs.pull_if_missing(client, model, hive, cli.err)
        worker_id = await jobs.spawn_worker(
            client, request.model_copy(update={"model": pulled}), cli.err
        )
        return (await jobs.wait_until_ready(client, [worker_id], 30))[0]

    result = cli.run(work)
    cli.out.print(
        f"worker {result.id} ready: {result.model_id} at {result.url}"
        f" (hive {result.hive_id or '-'}, {result.device}, {context_text(result)}"
        f"{', rerank' if result.rerank else ', embeddings' if result.embedding else ''})",
        markup=False,
        highlight=False,
    )


@app.command("list")
def list_workers(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The workers the queen knows: model, status, load, address, last seen."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> list[WorkerView]:
        return await client.workers()

    workers = cli.run(work)
    if as_json:
        print(to_json({"workers": workers}))
    elif workers:
        cli.out.print(workers_table(workers))
    else:
        cli.out.print("no workers — start one with `rbee worker spawn -m MODEL`", markup=False)


@app.command()
def stop(
    ctx: typer.Context,
    worker_id: Annotated[
        str, typer.Argument(metavar="ID", help="Worker id, as `rbee worker list`.")
    ],
) -> None:
    """Stop a worker process (through its hive)."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> dict[str, Any]:
        request = WorkerStopJob(operation="worker_stop", worker_id=worker_id)
        return await jobs.run_job(client, request, cli.err)

    cli.run(work)
    cli.out.print(f"worker {worker_id} stopped", markup=False, highlight=False)


@app.command()
def logs(
    ctx: typer.Context,
    worker_id: Annotated[
        str, typer.Argument(metavar="ID", help="Worker id, as `rbee worker list`.")
    ],
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many lines.")] = 50,
) -> None:
    """The end of a worker's log (its output and its engine's), from its hive; a stopped
    worker's too. Earlier workers of the same id left theirs beside it on the hive
    (worker-ID.log.1, .2, …)."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> str:
        return await client.worker_log(worker_id, lines)

    text = cli.run(work)
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
