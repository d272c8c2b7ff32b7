"""`rbee down`: stop a cluster that `rbee up` runs (in another terminal, or in the background),
and with it everything it started: its workers, hives and queen.

It asks the `rbee up` process to stop (SIGTERM, as Ctrl-C does) and waits for it to finish
stopping; an `rbee up` that was killed without a chance to clean up has its leftovers stopped
here instead."""

from __future__ import annotations

import time
from typing import Annotated

import psutil
import typer

from rbee.cli import state
from rbee.cli.cluster import clean_stale_lock
from rbee.cli.context import Cli, cli_of

POLL_S = 0.2


def _wait_gone(proc: psutil.Process, timeout_s: float) -> None:
    """Until it has exited: gone, or a zombie its parent (the shell) has not collected yet."""
    deadline = time.monotonic() + timeout_s
    while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() >= deadline:
            raise psutil.TimeoutExpired(timeout_s, proc.pid)
        time.sleep(POLL_S)


def _stop(cli: Cli, cluster: state.RunningCluster, timeout_s: float) -> bool:
    """SIGTERM to its `rbee up`, then wait for it (SIGKILL and the leftover clean-up after the
    timeout). True when it stopped by itself."""
    found = state.load(state.pid_path(cluster.record))
    proc = found[0].process() if found is not None else None
    if proc is None:  # gone already: what it left behind, if anything
        for leftover in clean_stale_lock(cluster.token, cluster.name):
            cli.say(f"stopped {leftover}, left by `rbee up`")
        return True
    cli.say(f"stopping cluster {cluster.name} (rbee up, pid {cluster.pid}, queen {cluster.url})…")
    try:
        proc.terminate()
        _wait_gone(proc, timeout_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        cli.warn(f"rbee up (pid {cluster.pid}) did not stop within {timeout_s:.0f}s: killed it")
        try:
            proc.kill()
            _wait_gone(proc, 10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
        for leftover in clean_stale_lock(cluster.token, cluster.name):
            cli.say(f"stopped {leftover}")
        return False
    # Its record goes when it has stopped everything; wait for that too (a zombie parent).
    deadline = time.monotonic() + 5
    while state.pid_path(cluster.record).exists() and time.monotonic() < deadline:
        if state.load_running(state.pid_path(cluster.record)) is None:
            break
        time.sleep(POLL_S)
    return True


def down(
    ctx: typer.Context,
    all_clusters: Annotated[
        bool, typer.Option("--all", help="Stop every cluster `rbee up` runs on this machine.")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds to let it stop its workers, hives and queen."),
    ] = 120,
) -> None:
    """Stop a cluster started with `rbee up`: its workers (and their engines), hives and queen.

    Which one: --cluster NAME, or the one whose queen --queen-url names, or the only one
    running here."""
    cli = cli_of(ctx)
    running = [c for c in state.running_clusters() if c.record != "queen-rbee"]
    if all_clusters:
        chosen = running
    else:
        if cli.problem is not None:
            cli.fail(cli.problem)
        chosen = [c for c in running if c.name == cli.cluster and c.url == cli.queen_url]
        if not chosen and cli.cluster == "queen":
            cli.fail(
                "the queen here was started with `rbee queen start`: stop it with "
                "`rbee hive stop` and then `rbee queen stop`"
            )
        if not chosen and cli.given_url is None and cli.cluster is None:
            chosen = [c for c in running if c.name == state.DEFAULT_CLUSTER]
    if not chosen:
        # An `rbee up` killed without a chance to clean up: what it left behind.
        stale = state.stale_clusters()
        names = stale if all_clusters else [cli.cluster or state.DEFAULT_CLUSTER]
        left = [n for n in names if n in stale]
        for name in left:
            for leftover in clean_stale_lock(cli.given_token, name):
                cli.say(f"stopped {leftover}, left by an `rbee up` that was killed")
        if not left:
            where = f" at {cli.given_url}" if cli.given_url else ""
            cli.say(f"no cluster started by `rbee up` is running here{where}: nothing to stop")
        return
    for cluster in chosen:
        if _stop(cli, cluster, timeout):
            cli.say(f"cluster {cluster.name} stopped")


def register(app: typer.Typer) -> None:
    app.command()(down)
