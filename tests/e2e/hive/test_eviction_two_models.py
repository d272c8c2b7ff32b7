"""Eviction between two different real models: SmolLM2-135M and Gemma 3 270M on a real hive
whose --memory-limit cannot hold Gemma beside a loaded SmolLM2. A SmolLM2 generation in flight
when Gemma is asked for completes in full with the text it has alone; Gemma is answered once
SmolLM2 has made room; the eviction is an event with its reason (GET /v1/model-events, which
`rbee status` shows); alternating requests for both are all answered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL, GEMMA_MODEL

from .conftest import Daemon, HiveProc, HiveStarter
from .test_eviction import chat, metric, queen  # noqa: F401  (the queen fixture)
from .test_memory_limit import hive_view, wait_for

pytestmark = pytest.mark.e2e
# On a CPU, Gemma's estimate is 477-595 MiB and SmolLM2's 275-421 MiB (2048 tokens and one slot
# to 8192 tokens and two), and they hold ~440-460 and ~250-400 MiB: either fits alone under this
# limit, never beside the other.
LIMIT = "600MiB"


@pytest.fixture
def hive(queen: Daemon, start_hive: HiveStarter, tmp_path: Path) -> Iterator[HiveProc]:  # noqa: F811
    (tmp_path / "models").mkdir(exist_ok=True)
    started = start_hive(flags=("--memory-limit", LIMIT))
    try:
        wait_for(
            "both bundled models' footprints at the queen",
            lambda: (
                (h := hive_view(queen, started.hive_id))
                and {DEFAULT_MODEL, GEMMA_MODEL} <= set(h["footprints"])
            ),
        )
        yield started
    finally:
        for worker in httpx.get(f"{started.url}/v1/workers", timeout=10).json()["workers"]:
            httpx.post(f"{started.url}/v1/workers/{worker['pid']}/stop", json={}, timeout=60)


def complete(at: Daemon, model: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{at.url}/v1/completions", json=body, timeout=600)


def streamed(at: Daemon, prompt: str, on_first: object = None) -> str:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 96,
        "temperature": 0,
        "stream": True,
    }
    parts: list[str] = []
    with httpx.stream("POST", f"{at.url}/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
            if parts and callable(on_first):
                on_first()
                on_first = None
    return "".join(parts)


def test_gemma_evicts_smollm2_without_cutting_its_generation_off(
    queen: Daemon,  # noqa: F811
    hive: HiveProc,
) -> None:
    prompt = "Write a long story about a dragon who learns to cook."
    alone = streamed(queen, prompt)
    assert len(alone) > 100
    with ThreadPoolExecutor(1) as pool:
        asked: list[Future[httpx.Response]] = []
        during = streamed(
            queen,
            prompt,
            on_first=lambda: asked.append(pool.submit(complete, queen, GEMMA_MODEL, "Paris is")),
        )
        gemma = asked[0].result(timeout=600)
    assert during == alone, "the generation in flight was neither cut off nor changed"
    assert gemma.status_code == 200, gemma.text
    assert gemma.json()["choices"][0]["text"]
    events = httpx.get(f"{queen.url}/v1/model-events", timeout=10).json()["events"]
    unloads = [(e["model"], e["reason"]) for e in events if e["change"] == "unloaded"]
    assert unloads == [(DEFAULT_MODEL, "evicted")]
    workers = httpx.get(f"{hive.url}/v1/workers", timeout=10).json()["workers"]
    assert [w["model"] for w in workers] == [GEMMA_MODEL]

    # Alternating requests for both models, four clients at once: every one is answered.
    def client(index: int) -> list[int]:
        codes = []
        for i in range(3):
            if (index + i) % 2:
                codes.append(complete(queen, GEMMA_MODEL, f"Number {index}-{i} is").status_code)
            else:
                codes.append(chat(queen, DEFAULT_MODEL, f"Say {index}-{i}").status_code)
        return codes

    with ThreadPoolExecutor(4) as pool:
        codes = [c for codes in pool.map(client, range(4)) for c in codes]
    assert codes == [200] * 12
    assert metric(queen, "rbee_model_swaps_total") >= 1
