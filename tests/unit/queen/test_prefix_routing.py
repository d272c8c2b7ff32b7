"""Prefix routing (issue 26): the pure policy, the prefix keys, the bounded index, the router."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

from rbee.contracts.workers import WorkerHeartbeat, WorkerInfo, WorkerStatus
from rbee.queen.registry import WorkerRegistry
from rbee.queen.routing.admission import AdmissionQueue
from rbee.queen.routing.load import LoadTracker
from rbee.queen.routing.policies import (
    LEAST_LOADED,
    OVERLOADED,
    PREFIX_HIT,
    SESSION,
    Candidate,
    least_loaded,
    prefix_affinity,
)
from rbee.queen.routing.prefixes import (
    BLOCK_CHARS,
    Affinity,
    PrefixIndex,
    Sessions,
    chained_blocks,
    route_key,
)
from rbee.queen.routing.router import Router
from rbee_testing.clock import FakeClock

SYSTEM = "You are a careful assistant for the ACME project. " * 40  # about 2,000 characters


def cand(worker_id: str, in_flight: int = 0, slots: int = 4) -> Candidate:
    return Candidate(worker_id, f"http://{worker_id}", slots, in_flight)


def chat(*turns: str, system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages, **extra}


# The pure policy.


def test_the_worker_holding_the_longest_prefix_wins() -> None:
    pool = [cand("a", 1), cand("b", 0), cand("c", 0)]
    decision = prefix_affinity(pool, 0, {"a": 9, "b": 3}, None, margin=0.5)
    assert (decision.choice.worker_id, decision.outcome) == ("a", PREFIX_HIT)


def test_an_overloaded_holder_loses_to_the_least_loaded() -> None:
    pool = [cand("a", 3), cand("b", 0), cand("c", 1)]  # a: 0.75 busy, b: idle
    decision = prefix_affinity(pool, 0, {"a": 9}, None, margin=0.5)
    assert (decision.choice.worker_id, decision.outcome) == ("b", OVERLOADED)
    # A wider margin keeps it on the worker that holds its prefix.
    decision = prefix_affinity(pool, 0, {"a": 9}, None, margin=0.75)
    assert (decision.choice.worker_id, decision.outcome) == ("a", PREFIX_HIT)


def test_past_an_overloaded_holder_a_shorter_prefix_still_counts() -> None:
    # a holds the whole conversation but is busy; c holds its system prompt, b nothing.
    pool = [cand("a", 4, 4), cand("b", 0), cand("c", 1)]
    decision = prefix_affinity(pool, 0, {"a": 9, "c": 4}, None, margin=0.5)
    assert (decision.choice.worker_id, decision.outcome) == ("c", OVERLOADED)


def test_no_prefix_anywhere_is_least_loaded_spreading_ties() -> None:
    pool = [cand("a"), cand("b"), cand("c", 2)]
    picks = [prefix_affinity(pool, t, {}, None, 0.5) for t in range(4)]
    assert [p.choice.worker_id for p in picks] == ["a", "b", "a", "b"]
    assert {p.outcome for p in picks} == {LEAST_LOADED}
    assert [p.choice for p in picks] == [least_loaded(pool, t) for t in range(4)]


def test_equal_prefixes_go_to_the_less_loaded_holder() -> None:
    pool = [cand("a", 2), cand("b", 1), cand("c", 0)]
    decision = prefix_affinity(pool, 0, {"a": 5, "b": 5}, None, margin=1.0)
    assert (decision.choice.worker_id, decision.outcome) == ("b", PREFIX_HIT)


def test_a_session_sticks_to_its_worker_unless_it_is_overloaded() -> None:
    pool = [cand("a", 1), cand("b", 0)]
    decision = prefix_affinity(pool, 0, {"b": 9}, "a", margin=0.5)
    assert (decision.choice.worker_id, decision.outcome) == ("a", SESSION)
    busy = [cand("a", 3), cand("b", 0)]
    decision = prefix_affinity(busy, 0, {"b": 9}, "a", margin=0.5)
    assert (decision.choice.worker_id, decision.outcome) == ("b", PREFIX_HIT)
    # A session whose worker is gone (not a candidate) goes by prefix.
    decision = prefix_affinity([cand("b")], 0, {}, "a", margin=0.5)
    assert (decision.choice.worker_id, decision.outcome) == ("b", LEAST_LOADED)


# Prefix keys.


def test_a_conversations_next_turn_extends_its_prefix() -> None:
    first = route_key(chat("Where is the build script?")).blocks
    second = route_key(chat("Where is the build script?", "In dev.", "And the tests?")).blocks
    assert len(first) > 4
    # Every full block of the first turn is the second's; only the last (partial) one differs.
    assert second[: len(first) - 1] == first[:-1]
    assert len(second) >= len(first)


def test_fields_other_than_the_prompt_do_not_change_the_key() -> None:
    plain = route_key(chat("hi")).blocks
    assert route_key(chat("hi", temperature=0.2, max_tokens=5, stream=True)).blocks == plain
    assert route_key(chat("hi", tools=[{"type": "function"}])).blocks != plain


def test_other_system_prompts_share_no_block() -> None:
    a = route_key(chat("hi", system="Project Alpha. " + SYSTEM)).blocks
    b = route_key(chat("hi", system="Project Beta. " + SYSTEM)).blocks
    assert not set(a) & set(b)


def test_chained_blocks_cover_everything_before_them() -> None:
    text = "x" * (3 * BLOCK_CHARS)
    blocks = chained_blocks(text)
    assert len(blocks) == 3
    # Same block text, different history: a different hash.
    assert len(set(blocks)) == 3
    assert chained_blocks("y" + text[1:])[2] != blocks[2]


def test_the_session_is_the_header_else_the_user_field() -> None:
    assert route_key(chat("hi", user="alice")).session == "alice"
    assert route_key(chat("hi", user="alice"), "conv-7").session == "conv-7"
    assert route_key(chat("hi")).session is None
    assert route_key(chat("hi", user=42)).session is None


# The bounded index.


def test_the_index_tells_how_far_each_worker_holds_a_prefix() -> None:
    index = PrefixIndex()
    long = route_key(chat("a question", "an answer", "another question")).blocks
    short = route_key(chat("a question")).blocks
    index.remember("w1", long)
    index.remember("w2", short)
    held = index.held(long, {"w1", "w2"})
    assert held["w1"] == len(long)
    assert held["w2"] == len(short) - 1  # the full blocks of the first turn
    assert index.held(long, {"w2"}) == {"w2": len(short) - 1}


def test_the_oldest_prefixes_are_forgotten_first() -> None:
    index = PrefixIndex(capacity=10)
    old, new = chained_blocks("o" * 5 * BLOCK_CHARS), chained_blocks("n" * 5 * BLOCK_CHARS)
    index.remember("w", old)
    index.remember("w", new)
    assert len(index) == 10
    index.remember("w", chained_blocks("z" * 2 * BLOCK_CHARS))
    # The two oldest entries went: the deepest blocks of `old`; its start is still known.
    assert index.held(old, {"w"}) == {"w": 3}
    assert index.held(new, {"w"}) == {"w": 5}


def test_memory_stays_bounded_under_100k_distinct_prefixes() -> None:
    index = PrefixIndex(capacity=20_000)
    sessions = Sessions(capacity=1_000)

    def fill(start: int, count: int) -> None:
        for i in range(start, start + count):
            index.remember(f"worker-{i % 3}", chained_blocks(f"conversation {i}"))
            sessions.bind(f"s{i}", f"worker-{i % 3}")

    fill(0, 50_000)
    assert (len(index), len(sessions)) == (20_000, 1_000)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        fill(50_000, 50_000)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 50,000 more distinct prefixes: each new one pushed the oldest out, so all the index and
    # the sessions hold now was allocated while traced, and it is what their bounds allow.
    assert (len(index), len(sessions)) == (20_000, 1_000)
    assert after - before < 20_000 * 256 + 1_000 * 256
    # The newest are known, the oldest forgotten.
    assert index.held(chained_blocks("conversation 99999"), {"worker-0"}) == {"worker-0": 1}
    assert index.held(chained_blocks("conversation 60000"), {"worker-0"}) == {}


def test_a_dropped_worker_leaves_nothing_behind() -> None:
    affinity = Affinity(margin=0.5)
    key = route_key(chat("hi", user="s1"))
    affinity.choose([cand("a")], 0, key)
    affinity.choose([cand("b"), cand("a", 4, 4)], 0, route_key(chat("yo", user="s2")))
    assert affinity.index.workers() == {"a", "b"}
    affinity.drop("a")
    assert affinity.index.workers() == {"b"}
    assert affinity.sessions.get("s1") is None
    assert affinity.sessions.get("s2") == "b"


# The router, with the registry and load tracker.


def beat(registry: WorkerRegistry, worker_id: str, slots: int = 2) -> None:
    info = WorkerInfo(
        id=worker_id, model_id="m", port=8080, status=WorkerStatus.READY, version="1", slots=slots
    )
    registry.update_worker(WorkerHeartbeat(worker=info))


def prefix_router(clock: FakeClock, margin: float = 0.5) -> tuple[Router, WorkerRegistry]:
    registry = WorkerRegistry(timeout_s=90, clock=clock)
    router = Router(
        registry,
        LoadTracker(10, clock),
        least_loaded,
        AdmissionQueue(8, 1),
        affinity=Affinity(margin),
        policy_name="prefix",
    )
    for w in ("a", "b", "c"):
        beat(registry, w)
    return router, registry


def test_each_conversation_stays_on_one_worker_and_they_spread() -> None:
    router, _ = prefix_router(FakeClock())
    homes: dict[int, set[str]] = {}
    turns: dict[int, list[str]] = {n: [] for n in range(6)}
    for _ in range(4):
        for n in range(6):
            turns[n] += [f"question {len(turns[n])} of conversation {n}", "an answer"]
            key = router.route_key(chat(*turns[n][:-1], system=f"Agent {n}. {SYSTEM}"), None)
            lease = router.try_take("m", key=key)
            assert lease is not None
            homes.setdefault(n, set()).add(lease.worker_id)
            router.release(lease)
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set().union(*homes.values())) == 3  # new conversations went least-loaded
    assert router.decisions["prefix", PREFIX_HIT] == 18
    assert router.decisions["prefix", LEAST_LOADED] == 6


def test_a_busy_home_sends_the_turn_to_the_least_loaded() -> None:
    router, _ = prefix_router(FakeClock(), margin=0.0)
    key = router.route_key(chat("hello"), None)
    first = router.try_take("m", key=key)
    assert first is not None  # still in flight: its worker is busier than the others
    second = router.try_take("m", key=key)
    assert second is not None
    assert second.worker_id != first.worker_id
    assert router.decisions["prefix", OVERLOADED] == 1


def test_a_forgotten_worker_loses_its_prefixes_and_sessions() -> None:
    router, registry = prefix_router(FakeClock())
    key = router.route_key(chat("hello", user="alice"), None)
    lease = router.try_take("m", key=key)
    assert lease is not None
    router.release(lease)
    registry.remove_worker(lease.worker_id)
    router.forget(lease.worker_id)
    assert router.affinity is not None
    assert lease.worker_id not in router.affinity.index.workers()
    assert router.affinity.sessions.get("alice") is None
    beat(registry, lease.worker_id)  # a new worker under the same id: its cache is empty
    again = router.try_take("m", key=key)
    assert again is not None
    assert router.decisions["prefix", LEAST_LOADED] == 2


def test_other_policies_count_their_decisions_and_ignore_keys() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(timeout_s=90, clock=clock)
    router = Router(registry, LoadTracker(10, clock), least_loaded, AdmissionQueue(8, 1))
    beat(registry, "a")
    assert router.route_key(chat("hi"), None) is None
    assert router.try_take("m") is not None
    assert router.decisions == {("least-loaded", "least_loaded"): 1}
