"""Prefix routing on a real cluster (issue 26): two SmolLM2 workers behind a queen with
`--routing-policy prefix`; each conversation's turns land on one worker, whose llama-server
takes the earlier turns from its KV cache (its own timings, in the answer's usage)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rbee.common.bundled import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT
from rbee_testing.metrics import parse_samples, value

from .conftest import Cluster, start_cluster

pytestmark = pytest.mark.e2e

# Long enough to span several of the queen's prefix blocks (256 characters each).
SYSTEM = (
    f"{DEFAULT_SYSTEM_PROMPT} You answer questions about travel in Europe: cities, rivers, "
    "buildings, food and history. Keep each answer to one short sentence, name places by "
    "their usual English names, and never invent a place that does not exist. When a "
    "question is unclear, answer the most likely reading of it rather than asking back."
)
QUESTIONS = (
    "Name a large city in France.",
    "What river runs through it?",
    "Name one famous building there.",
)


@pytest.fixture(scope="module")
def prefix_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    flags = ["--routing-policy", "prefix", "--queue-timeout", "120"]
    for c in start_cluster(tmp_path_factory.mktemp("prefix"), *flags):
        c.spawn_worker()
        c.spawn_worker()
        yield c


def ask(cluster: Cluster, messages: list[dict[str, str]]) -> tuple[str, str, dict[str, Any]]:
    response = httpx.post(
        f"{cluster.queen_url}/v1/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": messages, "max_tokens": 12, "temperature": 0},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    answer = body["choices"][0]["message"]["content"] or ""
    return response.headers["x-rbee-worker-id"], answer, body["usage"]


def test_a_conversation_stays_on_one_worker_and_its_cache(prefix_cluster: Cluster) -> None:
    assert len(prefix_cluster.workers()) == 2
    conversations: list[list[dict[str, str]]] = [
        [{"role": "system", "content": f"You are helping traveller {n}. {SYSTEM}"}]
        for n in range(2)
    ]
    homes: list[set[str]] = [set(), set()]
    later: list[dict[str, Any]] = []
    for turn, question in enumerate(QUESTIONS):
        for n, messages in enumerate(conversations):
            messages.append({"role": "user", "content": question})
            worker, answer, usage = ask(prefix_cluster, messages)
            messages.append({"role": "assistant", "content": answer})
            homes[n].add(worker)
            if turn:
                later.append(usage)
    assert all(len(home) == 1 for home in homes), homes
    # llama-server's own count: the earlier turns of a later turn's prompt came from its cache.
    for usage in later:
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached > usage["prompt_tokens"] // 2, usage
    samples = parse_samples(httpx.get(f"{prefix_cluster.queen_url}/metrics").text)
    hits = value(samples, "rbee_route_decisions_total", policy="prefix", outcome="prefix_hit")
    decisions = {k: v for k, v in samples.items() if k[0] == "rbee_route_decisions_total"}
    assert hits >= 4, (decisions, homes)
    cached_total = value(samples, "rbee_prompt_tokens_cached_total", model=DEFAULT_MODEL)
    assert cached_total >= sum(u["prompt_tokens_details"]["cached_tokens"] for u in later)


def test_a_worker_keeps_served_prompts_in_ram_only_up_to_its_prompt_cache(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """llama-server keeps prompts whose slot moved on in RAM (up to 8 GiB by default). A worker
    the queen starts gets as much as its KV cache: for one 512-token slot of SmolLM2, 11 MiB,
    room for two ~180-token prompts (~3.9 MiB each), not three."""
    for c in start_cluster(tmp_path_factory.mktemp("prompt-cache")):
        c.spawn_worker(slots=1, ctx_size=512)

        def cached(project: str, cluster: Cluster = c) -> int:
            system = f"You help with project {project}. {SYSTEM} " * 2
            messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
            _, _, usage = ask(cluster, messages)
            assert 150 < usage["prompt_tokens"] < 220, usage
            return int(usage["prompt_tokens_details"]["cached_tokens"])

        assert cached("A") == 0
        assert cached("B") < 10  # only the template's first tokens are shared with A
        # A comes back after B took the slot: restored from RAM, not read again.
        assert cached("A") > 150
        assert cached("C") < 10  # B and A wait in RAM
        # Saving C to make way for B leaves no room for three: B, the oldest, was dropped.
        assert cached("B") < 10
