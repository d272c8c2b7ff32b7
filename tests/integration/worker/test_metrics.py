"""The worker's /metrics in-process with a fake engine: tokens, timings and slots add up."""

from __future__ import annotations

import asyncio
from typing import Any

from rbee_testing.fake_engine import FakeEngine
from rbee_testing.metrics import Samples, parse_samples, value

MODEL = "fake-model"


def chat_body(**fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return {"model": MODEL, "messages": messages, **fields}


async def scrape(worker: Any) -> Samples:
    response = await worker.client.get("/metrics")
    assert response.status_code == 200
    return parse_samples(response.text)


async def test_tokens_and_timings_move_by_what_was_generated(make_worker: Any) -> None:
    worker = await make_worker(lambda: FakeEngine(token_delay_s=0.01))
    before = await scrape(worker)
    assert value(before, "rbee_worker_generated_tokens_total") == 0
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for stream in (False, False, True):
        body = chat_body(stream=stream, stream_options={"include_usage": True})
        response = await worker.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        if not stream:
            for key in usage:
                usage[key] += response.json()["usage"][key]
    after = await scrape(worker)
    # The streamed answer is the same six tokens ("Paris is the capital of France.").
    assert value(after, "rbee_worker_generated_tokens_total") == usage["completion_tokens"] * 3 / 2
    assert value(after, "rbee_worker_prompt_tokens_total") == usage["prompt_tokens"] * 3 / 2
    assert value(after, "rbee_worker_time_to_first_token_seconds_count") == 3
    # Six pieces per answer: one first token and five gaps.
    assert value(after, "rbee_worker_inter_token_seconds_count") == 3 * 5
    gaps = value(after, "rbee_worker_inter_token_seconds_sum") / 15
    assert 0.005 < gaps < 1.0, "each gap is about the engine's 10 ms pace"
    assert value(after, "rbee_worker_generations_total", finish="stop") == 3


async def test_slots_busy_and_waiting_while_generating(make_worker: Any) -> None:
    release = asyncio.Event()

    class Held(FakeEngine):
        async def generate(self, *args: Any, **kwargs: Any) -> Any:
            async with asyncio.timeout(10):
                await release.wait()
            return await super().generate(*args, **kwargs)

    worker = await make_worker(Held, slots=2, queue_size=4)
    idle = await scrape(worker)
    assert value(idle, "rbee_worker_slots") == 2
    assert value(idle, "rbee_worker_slots_busy") == 0
    assert value(idle, "rbee_worker_info", worker="w-test", model=MODEL, status="ready") == 1
    running = [
        asyncio.create_task(worker.client.post("/v1/chat/completions", json=chat_body()))
        for _ in range(3)
    ]
    await asyncio.sleep(0.2)
    busy = await scrape(worker)
    assert value(busy, "rbee_worker_slots_busy") == 2
    assert value(busy, "rbee_worker_requests_waiting") == 1
    release.set()
    assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200, 200]
    done = await scrape(worker)
    assert value(done, "rbee_worker_slots_busy") == 0
    assert value(done, "rbee_worker_requests_waiting") == 0


async def test_metrics_need_the_token_when_one_is_set(make_worker: Any) -> None:
    worker = await make_worker(token="s3cret")
    assert (await worker.client.get("/metrics")).status_code == 401
    ok = await worker.client.get("/metrics", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert "rbee_worker_slots" in ok.text


async def test_embeddings_count_their_vectors_and_prompt_tokens(make_worker: Any) -> None:
    worker = await make_worker(embedding=True)
    body = {"model": MODEL, "input": ["Paris is in France.", "Rome is in Italy."]}
    response = await worker.client.post("/v1/embeddings", json=body)
    assert response.status_code == 200
    after = await scrape(worker)
    assert value(after, "rbee_worker_embeddings_total") == 2
    assert (
        value(after, "rbee_worker_prompt_tokens_total") == response.json()["usage"]["prompt_tokens"]
    )
    assert value(after, "rbee_worker_generated_tokens_total") == 0


async def test_the_worker_s_background_loops_are_supervised_and_show_at_zero(
    make_worker: Any,
) -> None:
    """An alert on `rbee_background_errors_total` needs the series before any failure."""
    worker = await make_worker()
    samples = await scrape(worker)
    assert ("rbee_background_errors_total", frozenset({("loop", "heartbeat")})) in samples
    assert value(samples, "rbee_background_errors_total") == 0
