"""`rbee model download|list|rm`: the hives' model catalogs, through the queen's jobs API."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rbee.cli import jobs
from rbee.cli.context import cli_of
from rbee.cli.render import catalog_table, human_bytes, to_json
from rbee.clients.queen import QueenClient
from rbee.contracts.jobs import ModelDeleteJob, ModelDownloadJob, ModelListJob

app = typer.Typer(help="Model files on the hives: download, list, remove.", no_args_is_help=True)

HiveOption = Annotated[
    str | None, typer.Option("--hive", help="Hive id (default: the queen picks one).")
]


@app.command()
def download(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="What to fetch, e.g. a Hugging Face repo/file ref.")],
    hive: HiveOption = None,
) -> None:
    """Download a model onto a hive, with a progress bar. Ctrl-C cancels the download."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> dict[str, Any]:
        request = ModelDownloadJob(operation="model_download", model=ref, hive_id=hive)
        return await jobs.download(client, request, ref, cli.err)

    result = cli.run(work)
    model = result.get("model")
    model_id = model.get("id") if isinstance(model, dict) else result.get("model_id", model)
    where = f" on hive {result['hive_id']}" if result.get("hive_id") else ""
    size = result.get("size_bytes") or (
        model.get("size_bytes") if isinstance(model, dict) else None
    )
    extra = f" ({human_bytes(size)})" if size else ""
    cli.out.print(f"downloaded {model_id or ref}{where}{extra}", markup=False, highlight=False)


@app.command("list")
def list_models(
    ctx: typer.Context,
    hive: HiveOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The model files in the hives' catalogs (every online hive unless --hive)."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> dict[str, Any]:
        return await jobs.run_job(
            client, ModelListJob(operation="model_list", hive_id=hive), cli.err
        )

    result = cli.run(work)
    found = [m for m in result.get("models", []) if isinstance(m, dict)]
    if as_json:
        print(to_json({"models": found}))
    elif found:
        cli.out.print(catalog_table(found))
    else:
        where = f"hive {hive}" if hive else "any hive"
        cli.out.print(f"no models on {where} — `rbee model download REF` fetches one", markup=False)


@app.command("rm")
def remove(
    ctx: typer.Context,
    model_id: Annotated[str, typer.Argument(metavar="ID", help="Model id, as `rbee model list`.")],
    hive: HiveOption = None,
) -> None:
    """Remove a model file from a hive's catalog."""
    cli = cli_of(ctx)

    async def work(client: QueenClient) -> dict[str, Any]:
        request = ModelDeleteJob(operation="model_delete", model=model_id, hive_id=hive)
        return await jobs.run_job(client, request, cli.err)

    result = cli.run(work)
    where = f" from hive {result['hive_id']}" if result.get("hive_id") else ""
    cli.out.print(f"removed {model_id}{where}", markup=False, highlight=False)
