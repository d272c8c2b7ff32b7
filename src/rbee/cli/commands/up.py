"""`rbee up`: a whole cluster in the foreground, until Ctrl-C or SIGTERM — on this machine, or
as the cluster file says."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sys
from collections.abc import Coroutine
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import psutil
import typer

from rbee.cli import plan as plans
from rbee.cli import processes, state
from rbee.cli.cluster import Cluster, check_free, clean_stale_lock
from rbee.cli.cluster import log_path as cluster_log_path
from rbee.cli.clusterfile import ClusterFileError, default_path, load
from rbee.cli.context import Cli, CliError, advice, cli_of, device_option
from rbee.cli.engine import ensure_llama_server
from rbee.cli.plan import UpPlan
from rbee.clients.queen import QueenError
from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT
from rbee.common.sizes import parse_size
from rbee.contracts.workers import parse_keep_alive

T = TypeVar("T")
EXAMPLE_PROMPT = "What is the capital of France?"


def lan_urls(plan: UpPlan) -> list[str]:
    """Where other machines reach a queen that listens on all addresses: the URL the cluster
    file gives hives, else one per address of this machine (none for a loopback queen)."""
    if plan.queen_host not in ("0.0.0.0", "::", ""):
        return []
    if plan.queen_url_for_hives:
        return [plan.queen_url_for_hives]
    addresses = {
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and not address.address.startswith("127.")
    }
    return [processes.url_for(address, plan.port) for address in sorted(addresses)]


def path_line(argv0: str | None = None, path: str | None = None) -> str | None:
    """`export PATH="DIR:$PATH"` when the `rbee` running now (`./dev up` runs .venv/bin/rbee)
    is not the one the shell finds, so that the commands the banner shows work elsewhere."""
    program = Path(argv0 if argv0 is not None else sys.argv[0])
    if program.name != "rbee" or not program.is_file():
        return None
    found = shutil.which("rbee", path=path)
    if found is not None and Path(found).resolve() == program.resolve():
        return None
    return f'export PATH="{program.absolute().parent}:$PATH"'


def usage_text(plan: UpPlan, lan: list[str] | None = None, put_on_path: str | None = None) -> str:
    """What to paste: the OpenAI base URL, a curl call and the Python `openai` client; and,
    when `rbee` is not on the PATH, the line that puts it there."""
    base = f"{plan.queen_url}/v1"
    messages = [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": EXAMPLE_PROMPT},
    ]
    body = json.dumps({"model": plan.model, "messages": messages, "temperature": 0})
    auth = '  -H "Authorization: Bearer $RBEE_TOKEN" \\\n' if plan.token else ""
    api_key = 'os.environ["RBEE_TOKEN"]' if plan.token else '"not-needed"'
    count = len(plan.workers)
    models = ", ".join(dict.fromkeys(w.model for w in plan.workers)) or "nothing yet"
    workers = f"{count} worker{'s' if count != 1 else ''}"
    elsewhere = "".join(f"From other machines: {url}/v1\n" for url in lan or [])
    cluster_flag = "" if plan.name == state.DEFAULT_CLUSTER else f" --cluster {plan.name}"
    path_hint = (
        f"rbee is not on your PATH; this line puts it there (in ~/.bashrc: for good):\n"
        f"  {put_on_path}\n"
        if put_on_path
        else ""
    )
    logs = [str(cluster_log_path(plan, "queen"))]
    for hive in plan.hives:
        if hive.ssh is None:
            logs.append(str(cluster_log_path(plan, f"hive-{hive.hive_id}")))
        else:
            logs.append(f"`rbee hive logs --ssh {hive.ssh} --port {hive.port}`")
    return f"""
rbee is up: {workers} serving {models}

OpenAI base URL: {base}
{elsewhere}
curl:
  curl {base}/chat/completions \\
  -H "Content-Type: application/json" \\
{auth}  -d '{body}'

Python (pip install openai):
{"  import os" + chr(10) if plan.token else ""}  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key={api_key})
  reply = client.chat.completions.create(
      model="{plan.model}",
      messages=[
          {{"role": "system", "content": "{DEFAULT_SYSTEM_PROMPT}"}},
          {{"role": "user", "content": "{EXAMPLE_PROMPT}"}},
      ],
      temperature=0,
  )
  print(reply.choices[0].message.content)

Or: rbee{cluster_flag} infer "{EXAMPLE_PROMPT}"   (and: rbee{cluster_flag} chat, status, down)
Logs: {", ".join(logs)}
{path_hint}Press Ctrl-C to stop everything.
"""


async def until_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """Run `work` to its end (its result; its error is raised), or None once `stop` is set."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopper):
        pending.cancel()
    await asyncio.gather(task, stopper, return_exceptions=True)
    if stop.is_set():  # whatever the interrupted work said, the user asked us to stop
        return None
    return task.result()


async def run_cluster(cli: Cli, plan: UpPlan) -> int:
    """Start, serve until a signal or a daemon's death, stop. Returns the exit code.

    Output goes through `cli.say`, which never raises: a closed pipe or a hung-up terminal must
    not skip the cleanup. Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all stop the cluster;
    a second one hurries the stop."""
    say = cli.say
    cluster = Cluster(plan, cli.make_client, say)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            cluster.hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    signals = stop_signals()
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        if await until_stopped(cluster.start(), stop) is None:
            say("interrupted during start-up")
        else:
            say(usage_text(plan, lan_urls(plan), path_line()))
            if died := await until_stopped(cluster.watch(), stop):
                cli.warn(died)
                code = 1
    except (CliError, QueenError) as exc:
        cli.warn(advice(exc, plan.queen_url))
        code = 1
    finally:
        say("stopping…")
        try:
            await cluster.stop()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
    say("stopped" if code == 0 else "stopped after an error")
    return code


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops `rbee up`: Ctrl-C, SIGTERM, and SIGHUP when its terminal goes away (unless
    started under `nohup`, which asks to outlive the terminal)."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


def memory_limit_option(value: str | None) -> str | None:
    """A malformed or negative `--memory-limit` is a usage error before anything starts."""
    if value is not None:
        try:
            parse_size(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


class RoutingPolicy(StrEnum):
    """queen-rbee's --routing-policy."""

    PREFIX = "prefix"
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"


def keep_alive_option(value: str | None) -> str | None:
    """A keep-alive that is not a duration is a usage error before anything starts."""
    if value is not None:
        try:
            parse_keep_alive(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def up(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option("-m", "--model", help=f"Model the workers serve (default: {DEFAULT_MODEL})."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=64, help="How many workers [1].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="The queen's port [7833].")
    ] = None,
    hive_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="The hive's port [7835; with --port P: P+2]."),
    ] = None,
    hive_id: Annotated[
        str | None, typer.Option(help="Id of this machine's hive (default: hostname).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            callback=device_option,
            help="Device for the workers: cpu:0, cuda:N or metal:0 (default: the GPU or CPU "
            "with room for the model).",
        ),
    ] = None,
    models_dir: Annotated[
        Path | None, typer.Option(help="Where the hive keeps model files.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            envvar="RBEE_CONFIG",
            help="Cluster file: queen, hives (here or over SSH), workers "
            "[~/.config/rbee/cluster.toml, when it exists].",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be started, start nothing.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for the workers to be ready.")
    ] = 300,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            callback=memory_limit_option,
            metavar="SIZE",
            help="Most memory the workers may take on each device of this machine's hive(s), "
            "e.g. 512MiB or 8GiB (over the cluster file's memory_limit).",
        ),
    ] = None,
    ctx_size: Annotated[
        int | None,
        typer.Option(
            "--ctx-size",
            min=16,
            max=1 << 20,
            help="Tokens of context per slot of every worker, those started on demand too "
            "(default: the model's trained context, up to 8192 on a CPU and 32768 on a GPU, "
            "as far as the device's memory allows).",
        ),
    ] = None,
    slots: Annotated[
        int | None,
        typer.Option(
            "--slots",
            min=1,
            max=64,
            help="Requests each worker serves at once (default: 2 where memory allows).",
        ),
    ] = None,
    keep_alive: Annotated[
        str | None,
        typer.Option(
            callback=keep_alive_option,
            metavar="DURATION",
            help="How long a worker the queen starts on demand stays loaded once idle, e.g. "
            "30s, 10m, 1h; 0: unload when idle; -1: never [5m] (over the cluster file's).",
        ),
    ] = None,
    routing_policy: Annotated[
        RoutingPolicy | None,
        typer.Option(
            help="How the queen picks a worker: prefix sends a conversation's turns where its "
            "prompt is cached (least-loaded when none holds it or it is overloaded) [prefix] "
            "(over the cluster file's).",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            callback=cluster_name_option,
            help="This cluster's name, for running several side by side (each on its own "
            "--port): other commands pick it with --cluster NAME (default: 'default' on port "
            "7833, else port-PORT).",
        ),
    ] = None,
) -> None:
    """Start a queen, hives and workers; serve until Ctrl-C, then stop them all.

    Without a cluster file, everything runs on this machine. With one (--config, RBEE_CONFIG,
    or ~/.config/rbee/cluster.toml), the queen runs here and the hives where it says: here or
    on other machines over SSH."""
    cli = cli_of(ctx)
    limit = parse_size(memory_limit) if memory_limit is not None else None
    path = config or default_path()
    if config is not None or path.is_file():
        flags = {
            "--model": model,
            "--workers": workers,
            "--hive-port": hive_port,
            "--hive-id": hive_id,
            "--device": device,
            "--models-dir": models_dir,
        }
        if given := [flag for flag, value in flags.items() if value is not None]:
            cli.fail(
                f"{', '.join(given)}: the cluster file {path} says what to start "
                "(edit it, or point --config at another file)"
            )
        try:
            cluster = load(path, local_hive_id=_local_hive_id())
        except ClusterFileError as exc:
            cli.fail(str(exc))
        plan = plans.from_file(
            cluster,
            path,
            token=cli.given_token,
            port=port,
            ready_timeout_s=timeout,
            memory_limit=limit,
        )
        plan = replace(plan, queen_args=(*plan.queen_args, *cluster.model_flags()))
        plan = replace(plan, name=name or default_cluster_name(plan.port))
    else:
        queen_port = port or 7833
        cluster_name = name or default_cluster_name(queen_port)
        plan = plans.from_flags(
            model=model or DEFAULT_MODEL,
            workers=workers or 1,
            port=queen_port,
            hive_port=hive_port or default_hive_port(queen_port),
            hive_id=hive_id or _local_hive_id(cluster_name),
            token=cli.given_token,
            device=device,
            models_dir=models_dir,
            ready_timeout_s=timeout,
            memory_limit=limit,
        )
        plan = replace(plan, name=cluster_name)
    if keep_alive is not None:  # the last of a flag given twice wins: over the cluster file's
        plan = replace(plan, queen_args=(*plan.queen_args, "--keep-alive", keep_alive))
    if routing_policy is not None:
        policy = ("--routing-policy", routing_policy.value)
        plan = replace(plan, queen_args=(*plan.queen_args, *policy))
    plan = plans.sized(plan, ctx_size, slots)
    if dry_run:
        for line in plans.describe(plan):
            cli.out.print(line, markup=False, highlight=False, soft_wrap=True)
        if problem := plan.problem():
            cli.fail(problem)
        return
    if problem := plan.problem():
        cli.fail(problem)
    for leftover in clean_stale_lock(cli.given_token, plan.name):
        cli.err.print(f"stopped {leftover}, left by an earlier `rbee up`", markup=False)
    try:
        check_free(plan)
    except CliError as exc:
        cli.fail(str(exc))
    if any(hive.ssh is None for hive in plan.hives):
        ensure_llama_server(cli)  # a pip install builds llama-server here on first use
    raise typer.Exit(asyncio.run(run_cluster(cli, plan)))


def _local_hive_id(cluster: str = state.DEFAULT_CLUSTER) -> str:
    """The host name; with the cluster's name after it for a cluster other than the default,
    so that two clusters' hives on one machine never take each other's workers for their own."""
    host = socket.gethostname() or "local"
    return host if cluster == state.DEFAULT_CLUSTER else f"{host}-{cluster}"[:128]


def default_cluster_name(port: int) -> str:
    """`default` on the default port; `port-PORT` for a cluster on another port."""
    return state.DEFAULT_CLUSTER if port == 7833 else f"port-{port}"


def default_hive_port(queen_port: int) -> int:
    """7835 beside the default queen port; two above another queen port (so a second cluster
    started with only --port finds its hive's port free too)."""
    if queen_port == 7833:
        return 7835
    return queen_port + 2 if queen_port <= 65533 else queen_port - 2


def cluster_name_option(value: str | None) -> str | None:
    if value is not None and not state.CLUSTER_NAME.match(value):
        raise typer.BadParameter("use letters, digits, '.', '_' and '-' (at most 64)")
    return value


def register(app: typer.Typer) -> None:
    app.command()(up)
