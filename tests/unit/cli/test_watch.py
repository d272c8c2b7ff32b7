"""The live view of `rbee status --watch`, fed events by hand."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from rbee.cli.watch import LiveCluster


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def worker(status: str = "ready", **extra: Any) -> dict[str, Any]:
    return {
        "id": "w-1",
        "model_id": "m",
        "port": 8081,
        "status": status,
        "version": "1",
        "online": True,
        "available": status == "ready",
        "last_seen_s": 0.0,
        "timestamp": "2026-01-01T00:00:00Z",
        **extra,
    }


def text(view: LiveCluster) -> str:
    console = Console(width=160, record=True)
    console.print(view.render("http://queen"))
    return console.export_text()


def test_events_change_what_is_shown_and_ages_tick_on() -> None:
    clock = Clock()
    view = LiveCluster(clock)
    assert not view.apply("summary", {"workers": [], "hives": []})
    assert view.apply("worker", {"state": "ready", "worker_id": "w-1", "worker": worker()})
    assert "1 worker(s), 1 ready" in text(view)
    clock.now += 42
    assert "42s ago" in text(view)
    assert view.apply("worker", {"state": "busy", "worker_id": "w-1", "worker": worker("busy")})
    assert "busy" in text(view)
    # New live figures are a change (a frame into a pipe follows tokens/s while an answer
    # runs); the same figures again are not.
    assert view.apply("stats", {"requests_per_s": 2.5, "ttft_s": 0.12, "tokens_per_s": 40})
    assert not view.apply("stats", {"requests_per_s": 2.5, "ttft_s": 0.12, "tokens_per_s": 40})
    shown = text(view)
    assert "2.50 req/s" in shown
    assert "first token 120 ms" in shown
    assert "40.0 tokens/s" in shown
    assert view.apply("worker", {"state": "removed", "worker_id": "w-1"})
    assert "no workers yet" in text(view)


def test_an_event_it_does_not_understand_is_skipped() -> None:
    view = LiveCluster()
    assert not view.apply("worker", {"state": "ready", "worker_id": "x", "worker": {"id": 1}})
    assert not view.apply("something-new", {"a": 1})
    assert "0 worker(s)" in text(view)
