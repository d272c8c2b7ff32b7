"""`rbee model download|pull|list|rm`: the hives' model catalogs, through the queen's jobs API;
without a running cluster, downloads and the list go to this machine's models folder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import httpx
import psutil
import typer
from rich.console import Console

from rbee.cli import jobs
from rbee.cli.context import Cli, CliError, cli_of
from rbee.cli.render import catalog_table, human_bytes, to_json
from rbee.clients.queen import QueenClient, QueenUnreachable
from rbee.common.errors import RbeeError
from rbee.common.gguf_header import GgufHeaderError
from rbee.common.model_memory import default_sizing
from rbee.contracts.hives import Device, HiveView, ModelFootprint
from rbee.contracts.jobs import JobEvent, ModelDeleteJob, ModelDownloadJob, ModelListJob
from rbee.hive.catalog import Catalog, parse_source
from rbee.hive.downloads import Downloader
from rbee.hive.footprints import read_footprint
from rbee.hive.settings import CACHE_DIR

app = typer.Typer(
    help="Model files on the hives: download (or pull), list, remove.", no_args_is_help=True
)
LOCAL_MODELS_DIR = CACHE_DIR / "models"  # where a hive started without --models-dir keeps them

HiveOption = Annotated[
    str | None, typer.Option("--hive", help="Hive id (default: the queen picks one).")
]
ModelsDirOption = Annotated[
    Path | None,
    typer.Option(
        help="This machine's models folder, used without a running cluster or with --local "
        f"[{LOCAL_MODELS_DIR}].",
    ),
]
LocalOption = Annotated[
    bool,
    typer.Option("--local", help="This machine's models folder, whether a cluster runs or not."),
]


def download(
    ctx: typer.Context,
    ref: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A Hugging Face file as org/repo:file.gguf, or an https://…/file.gguf URL.",
        ),
    ],
    hive: HiveOption = None,
    models_dir: ModelsDirOption = None,
    local: LocalOption = False,
) -> None:
    """Download a model onto a hive, with a progress bar; without a running cluster (or with
    --local), into this machine's models folder, where a hive started here finds it. Ctrl-C
    stops; the same command again resumes where it stopped."""
    cli = cli_of(ctx)
    try:
        parse_source(ref)
    except RbeeError as exc:
        cli.fail(exc.message)
    if local or (hive is None and not _queen_answers(cli)):
        folder = (models_dir or LOCAL_MODELS_DIR).expanduser()
        if not local:
            cli.err.print(
                f"no cluster is running: downloading into {folder}", markup=False, highlight=False
            )
        fetched = cli.call(lambda: download_here(ref, folder, cli.err))
        cli.out.print(
            f"downloaded {fetched['id']} into {folder} ({human_bytes(fetched.get('size_bytes'))})",
            markup=False,
            highlight=False,
        )
        return

    async def work(client: QueenClient) -> dict[str, Any]:
        request = ModelDownloadJob(operation="model_download", model=ref, hive_id=hive)
        return await jobs.download(client, request, ref, cli.err)

    result = cli.run(work)
    model = result.get("model")
    model_id = result.get("id") or (
        model.get("id") if isinstance(model, dict) else result.get("model_id", model)
    )
    where = f" on hive {result['hive_id']}" if result.get("hive_id") else ""
    size = result.get("size_bytes") or (
        model.get("size_bytes") if isinstance(model, dict) else None
    )
    extra = f" ({human_bytes(size)})" if size else ""
    cli.out.print(f"downloaded {model_id or ref}{where}{extra}", markup=False, highlight=False)


def _queen_answers(cli: Cli) -> bool:
    """A queen answers where this command would send its job."""

    async def probe() -> bool:
        try:
            async with cli.client() as client:
                await client.hives()
        except QueenUnreachable:
            return False
        return True

    try:
        return asyncio.run(probe())
    except CliError:
        return True  # several clusters and none chosen: the job path says so


async def download_here(ref: str, models_dir: Path, console: Console) -> dict[str, Any]:
    """Download into a models folder of this machine, as a hive would (same checks, resume)."""
    source = parse_source(ref)
    catalog = Catalog(models_dir)
    progress = jobs.download_progress(console)
    timeout = httpx.Timeout(30.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, trust_env=True) as http:
        downloader = Downloader(catalog, http)
        with progress:
            bar = progress.add_task(f"downloading {source.id}", total=None)

            def report(event: JobEvent) -> None:
                if event.type == "progress" and event.bytes_done is not None:
                    progress.update(bar, completed=event.bytes_done, total=event.bytes_total)
                elif event.type == "log" and event.message:
                    progress.console.print(event.message, style="dim", markup=False)

            try:
                model = await downloader.download(source, "local", report, keep_on_cancel=True)
            except RbeeError as exc:
                raise CliError(exc.message) from None
            except asyncio.CancelledError:
                raise CliError(
                    "download stopped; the same command again resumes it", exit_code=130
                ) from None
    return model.model_dump()


app.command()(download)
app.command("pull", help="Same as `rbee model download` (as Ollama users type it).")(download)


@app.command("list")
def list_models(
    ctx: typer.Context,
    hive: HiveOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    models_dir: ModelsDirOption = None,
    local: LocalOption = False,
) -> None:
    """Every model file on every online hive (or --hive), with its size, quantization, trained
    context and the memory a worker of it needs at its default context; without a running
    cluster (or with --local), those in this machine's models folder."""
    cli = cli_of(ctx)
    if local or (hive is None and not _queen_answers(cli)):
        folder = (models_dir or LOCAL_MODELS_DIR).expanduser()
        found = local_catalog(folder)
        where = f"{folder} (no cluster is running)" if not local else str(folder)
    else:

        async def work(client: QueenClient) -> tuple[dict[str, Any], list[HiveView]]:
            listed = await jobs.run_job(
                client, ModelListJob(operation="model_list", hive_id=hive), cli.err
            )
            return listed, await client.hives()

        result, hives = cli.run(work)
        found = with_memory(
            [m for m in result.get("models", []) if isinstance(m, dict)],
            {h.id: h for h in hives},
        )
        where = f"hive {hive}" if hive else "any hive"
    if as_json:
        print(to_json({"models": found}))
    elif found:
        cli.out.print(catalog_table(found))
    else:
        cli.out.print(
            f"no models on {where} — `rbee model pull org/repo:file.gguf` fetches one",
            markup=False,
        )


def sizing_fields(footprint: ModelFootprint | None, device: Device | None) -> dict[str, Any]:
    """What `rbee model list` adds to a catalog entry: quantization, trained context, and the
    default context, slots and memory of a worker of it on the device with most room."""
    if footprint is None:
        return {}
    fields: dict[str, Any] = {
        "quantization": footprint.quantization,
        "context_length": footprint.context_length,
    }
    if device is not None:
        estimate = default_sizing(footprint, device.memory_free_bytes, device_kind=device.kind)
        fields |= {
            "ctx_size": estimate.ctx_size,
            "slots": estimate.slots,
            "memory_bytes": estimate.total,
        }
    return fields


def roomiest(devices: Iterable[Device]) -> Device | None:
    """The device a worker would go to: a GPU before the CPU, then the most free memory."""
    usable = [d for d in devices if d.problem is None]
    return max(usable, key=lambda d: (d.kind != "cpu", d.memory_free_bytes), default=None)


def with_memory(models: list[dict[str, Any]], hives: dict[str, HiveView]) -> list[dict[str, Any]]:
    found = []
    for model in models:
        hive = hives.get(str(model.get("hive_id")))
        footprint = hive.footprints.get(str(model.get("id"))) if hive else None
        device = roomiest(hive.devices) if hive else None
        found.append({**model, **sizing_fields(footprint, device)})
    return found


def local_catalog(models_dir: Path) -> list[dict[str, Any]]:
    """This machine's models folder as a hive started here would list it (on its CPU)."""
    memory = psutil.virtual_memory()
    cpu = Device(
        id="cpu:0",
        kind="cpu",
        name="cpu",
        memory_total_bytes=memory.total,
        memory_free_bytes=memory.available,
    )
    found = []
    for model in Catalog(models_dir).models():
        try:
            footprint: ModelFootprint | None = read_footprint(Path(model.path))
        except (GgufHeaderError, OSError, ValueError):
            footprint = None
        found.append({**model.model_dump(), "hive_id": None, **sizing_fields(footprint, cpu)})
    return found


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
