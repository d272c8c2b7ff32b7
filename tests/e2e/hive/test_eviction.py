"""Eviction with real processes: a real hive whose --memory-limit holds one SmolLM2 worker, two
models (the same weights under a second name), a real queen swapping between them on demand.
No request is lost or cut off: a generation in flight when the other model is asked for
completes in full, with the text it has alone."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL, bundled_model_path
from rbee_testing.processes import ServerProcess, console_script, free_port

from .conftest import Daemon, HiveProc, HiveStarter
from .test_memory_limit import SECOND, hive_view, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def queen() -> Iterator[Daemon]:
    """A queen whose requests may wait out a few loads of the model they need."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [console_script("queen-rbee"), "--port", str(port)]
    args += ["--queue-timeout", "240", "--swap-max-wait", "60"]
    with ServerProcess(args, health_url=f"{url}/health") as proc:
        yield Daemon(proc, url)


@pytest.fixture
def hive(queen: Daemon, start_hive: HiveStarter, tmp_path: Path) -> Iterator[HiveProc]:
    (tmp_path / "models").mkdir()
    shutil.copy(bundled_model_path(DEFAULT_MODEL), tmp_path / "models" / SECOND)
    started = start_hive(flags=("--memory-limit", "400MiB"))  # one SmolLM2 worker, not two
    try:
        wait_for(
            "both models' footprints at the queen",
            lambda: (
                (h := hive_view(queen, started.hive_id))
                and {DEFAULT_MODEL, SECOND} <= set(h["footprints"])
            ),
        )
        yield started
    finally:
        for worker in httpx.get(f"{started.url}/v1/workers", timeout=10).json()["workers"]:
            httpx.post(f"{started.url}/v1/workers/{worker['pid']}/stop", json={}, timeout=60)


def chat(queen: Daemon, model: str, content: str = "Hi", max_tokens: int = 4) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return httpx.post(f"{queen.url}/v1/chat/completions", json=body, timeout=600)


def metric(queen: Daemon, line_start: str) -> float:
    text = httpx.get(f"{queen.url}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def test_alternating_concurrent_requests_for_two_models_are_all_answered(
    queen: Daemon, hive: HiveProc
) -> None:
    def client(index: int) -> list[int]:
        models = [DEFAULT_MODEL, SECOND] if index % 2 == 0 else [SECOND, DEFAULT_MODEL]
        return [chat(queen, models[i % 2], f"Say {index}-{i}").status_code for i in range(3)]

    with ThreadPoolExecutor(4) as pool:
        codes = [c for codes in pool.map(client, range(4)) for c in codes]
    assert codes == [200] * 12
    swaps = metric(queen, "rbee_model_swaps_total")
    evicted = metric(queen, 'rbee_model_unloads_total{model="')
    print(f"12 requests over 2 models in one worker's room: {swaps:.0f} swaps")
    assert swaps >= 1
    assert evicted == swaps
    # Never both at once: the limit holds one.
    assert len(httpx.get(f"{hive.url}/v1/workers", timeout=10).json()["workers"]) == 1


def stream_text(queen: Daemon, model: str, prompt: str, on_first: object = None) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 120,
        "temperature": 0,
        "stream": True,
    }
    parts: list[str] = []
    with httpx.stream(
        "POST", f"{queen.url}/v1/chat/completions", json=body, timeout=600
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                parts.append(choice["delta"].get("content") or "")
            if parts and callable(on_first):
                on_first()
                on_first = None
    return "".join(parts)


def test_a_generation_in_flight_when_the_other_model_is_asked_for_completes_in_full(
    queen: Daemon, hive: HiveProc
) -> None:
    prompt = "Write a long story about a dragon who learns to cook."
    alone = stream_text(queen, DEFAULT_MODEL, prompt)
    assert len(alone) > 100
    with ThreadPoolExecutor(1) as pool:
        other: list[object] = []
        during = stream_text(
            queen,
            DEFAULT_MODEL,
            prompt,
            on_first=lambda: other.append(pool.submit(chat, queen, SECOND)),
        )
        answer = other[0].result(timeout=600)  # type: ignore[attr-defined]
    assert during == alone, "the generation in flight was neither cut off nor changed"
    assert answer.status_code == 200, answer.text
    assert metric(queen, "rbee_model_swaps_total") == 1
    assert (
        metric(queen, f'rbee_model_unloads_total{{model="{DEFAULT_MODEL}",reason="evicted"}}') == 1
    )
