"""`rbee status --watch`: the dashboard's live view in the terminal, fed by the same stream.

`LiveCluster` folds the queen's events into what the screen shows (pure, no I/O); `watch` keeps
the stream open, redraws, and says so plainly when the queen cannot be reached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from rbee.cli.context import Cli
from rbee.cli.render import hives_table, workers_table
from rbee.clients.queen import QueenClient, QueenHTTPError, QueenUnreachable
from rbee.contracts.hives import HiveView
from rbee.contracts.workers import WorkerView

RETRY_S = 1.0


class LiveCluster:
    """What the queen's stream has said so far; ages tick on from when each view arrived."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.workers: dict[str, tuple[WorkerView, float]] = {}
        self.hives: dict[str, tuple[HiveView, float]] = {}
        self.stats: dict[str, Any] = {}
        self.problem: str | None = None

    def shape(self) -> tuple[object, ...]:
        """What a person would call a change: who is there, their status and load, and the live
        figures as the view shows them (so that a frame into a pipe follows tokens/s while an
        answer runs, not only when a worker's load changes)."""
        s = self.stats
        figures = (
            (
                f"{s.get('requests_per_s', 0):.2f}",
                f"{s.get('tokens_per_s', 0):.1f}",
                s.get("queue", 0),
                s.get("in_flight", 0),
            )
            if s
            else None
        )
        return (
            tuple(
                sorted((w.id, w.status, w.online, w.in_flight) for w, _ in self.workers.values())
            ),
            tuple(sorted((h.id, h.online, len(h.models)) for h, _ in self.hives.values())),
            self.problem,
            figures,
        )

    def apply(self, event: str, data: dict[str, Any]) -> bool:
        """Take one event; True when the cluster's shape changed (not just ages or figures)."""
        before = self.shape()
        self._apply(event, data)
        self.problem = None
        return self.shape() != before

    def _apply(self, event: str, data: dict[str, Any]) -> None:
        now = self._clock()
        try:
            if event == "summary":
                self.workers = {
                    w["id"]: (WorkerView.model_validate(w), now) for w in data.get("workers", [])
                }
                self.hives = {
                    h["id"]: (HiveView.model_validate(h), now) for h in data.get("hives", [])
                }
            elif event == "worker":
                if data.get("state") == "removed":
                    self.workers.pop(str(data.get("worker_id")), None)
                elif isinstance(data.get("worker"), dict):
                    view = WorkerView.model_validate(data["worker"])
                    self.workers[view.id] = (view, now)
            elif event == "hive" and isinstance(data.get("hive"), dict):
                hive = HiveView.model_validate(data["hive"])
                self.hives[hive.id] = (hive, now)
            elif event == "stats":
                self.stats = data
        except ValidationError:
            return  # an event from a newer queen: skip it rather than stop watching

    def _aged(self) -> tuple[list[WorkerView], list[HiveView]]:
        now = self._clock()
        workers = [
            w.model_copy(update={"last_seen_s": w.last_seen_s + now - at})
            for w, at in self.workers.values()
        ]
        hives = [
            h.model_copy(update={"last_seen_s": h.last_seen_s + now - at})
            for h, at in self.hives.values()
        ]
        return sorted(workers, key=lambda w: w.id), sorted(hives, key=lambda h: h.id)

    def render(self, queen_url: str) -> RenderableType:
        workers, hives = self._aged()
        ready = sum(1 for w in workers if w.available)
        head = Text(
            f"queen {queen_url}: {len(hives)} hive(s), {len(workers)} worker(s), {ready} ready"
        )
        parts: list[RenderableType] = [head]
        if self.problem:
            parts.append(Text(f"! {self.problem} — retrying", style="bold red"))
        if self.stats:
            s = self.stats
            ttft = s.get("ttft_s")
            parts.append(
                Text(
                    f"{s.get('requests_per_s', 0):.2f} req/s   "
                    f"first token {'-' if ttft is None else f'{ttft * 1000:.0f} ms'}   "
                    f"{s.get('tokens_per_s', 0):.1f} tokens/s   "
                    f"queue {s.get('queue', 0)}   in flight {s.get('in_flight', 0)}"
                )
            )
        if hives:
            parts += [Text(), hives_table(hives)]
        parts.append(Text())
        parts.append(workers_table(workers) if workers else Text("no workers yet"))
        return Group(*parts)


async def watch(cli: Cli, client: QueenClient, view: LiveCluster | None = None) -> None:
    """Follow the stream until Ctrl-C; reconnect on its own when the queen goes away.

    On a terminal the view is redrawn in place; into a pipe or a file, each change is printed
    as a new frame (a terminal-less Live would print only when it ends)."""
    view = view or LiveCluster()
    if not cli.out.is_terminal:

        def print_frame(changed: bool) -> None:
            if changed:
                cli.out.print(view.render(cli.queen_url), "\n")
                cli.out.file.flush()

        await _follow(cli, client, view, print_frame)
        return
    with Live(view.render(cli.queen_url), console=cli.out, auto_refresh=False) as live:

        def redraw(changed: bool = True) -> None:
            live.update(view.render(cli.queen_url), refresh=True)

        async def tick() -> None:  # ages move on between events
            while True:
                await asyncio.sleep(1.0)
                redraw()

        ticker = asyncio.create_task(tick())
        try:
            await _follow(cli, client, view, redraw)
        finally:
            ticker.cancel()


async def _follow(
    cli: Cli, client: QueenClient, view: LiveCluster, redraw: Callable[[bool], None]
) -> None:
    while True:
        told = view.problem
        try:
            async with aclosing(client.watch()) as events:
                first = True  # the cluster as found on (re)connecting is always shown
                async for event, data in events:
                    redraw(view.apply(event, data) or first)
                    first, told = False, None
            view.problem = "the queen closed the stream"
        except QueenHTTPError:
            raise  # a refused token or similar: retrying will not help
        except QueenUnreachable:
            view.problem = f"queen unreachable at {cli.queen_url}"
        except Exception as exc:  # a cut connection: tell, then try again
            view.problem = f"lost the queen ({type(exc).__name__})"
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Ctrl-C came, and the library turned it into the error just caught (httpx raises
            # ConnectError for a connect cut short): stop, never retry.
            raise asyncio.CancelledError
        redraw(view.problem != told)
        await asyncio.sleep(RETRY_S)
