"""`rbee up` on a machine that has no `llama-server` yet (a `pip install`): build it once, with
one line saying why and a progress bar, into the cache every later start finds it in."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rbee.cli.context import Cli
from rbee.common.engine_build import (
    EngineBuildError,
    build_dir,
    build_kind,
    build_llama_server,
    find_llama_server,
    progress_of,
)


def ensure_llama_server(cli: Cli) -> Path:
    """The `llama-server` workers will run: found, or compiled now (minutes, once)."""
    if (found := find_llama_server()) is not None:
        return found
    where = build_dir()
    cli.say(
        f"rbee: llama.cpp's server is not built on this machine yet: compiling it once "
        f"({build_kind() or 'cpu'} build) into {where.parent if where else '~/.cache/rbee'} "
        "— about 15 minutes on two cores; later starts reuse it"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=cli.err, transient=True) as bar:
        task = bar.add_task("compiling llama.cpp", total=100)

        def on_line(line: str) -> None:
            percent = progress_of(line)
            if percent is not None:
                bar.update(task, completed=percent)
            else:
                bar.console.print(line, markup=False, highlight=False)

        try:
            binary = build_llama_server(on_line)
        except EngineBuildError as exc:
            cli.fail(f"{exc} (`rbee doctor` checks what building needs)")
    cli.say(f"rbee: llama-server built: {binary}")
    return binary
