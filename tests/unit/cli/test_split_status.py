"""`rbee status` shows one worker spread over several hives: each hive and each part's share."""

from __future__ import annotations

from rich.console import Console

from rbee.cli.render import workers_table
from rbee.contracts.workers import WorkerPart, WorkerStatus, WorkerView


def view(**fields: object) -> WorkerView:
    return WorkerView.model_validate(
        {
            "id": "a-split-1",
            "model_id": "smollm2-135m-instruct",
            "port": 8080,
            "status": WorkerStatus.READY,
            "version": "1",
            "hive_id": "a",
            "online": True,
            "available": True,
            "last_seen_s": 1.0,
            "timestamp": "2026-01-01T00:00:00Z",
            **fields,
        }
    )


def rendered(worker: WorkerView) -> str:
    console = Console(width=250, record=True)
    console.print(workers_table([worker]))
    return console.export_text()


def test_a_split_worker_shows_its_hives_and_parts() -> None:
    parts = [
        WorkerPart(hive_id="a", device="cpu:0", bytes=58_200_000),
        WorkerPart(hive_id="b", device="cpu:0", bytes=41_100_000),
    ]
    text = rendered(view(parts=parts))
    assert "a+b" in text
    assert "a:cpu:0 58.2 MB + b:cpu:0 41.1 MB" in text


def test_a_worker_on_one_device_shows_its_hive_and_device() -> None:
    text = rendered(view(device="cpu:0"))
    assert "a+b" not in text
    assert " a " in text
    assert "cpu:0" in text
