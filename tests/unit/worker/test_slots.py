"""Admission: N at once, a bounded line, then 429 — and a slot is never lost or handed out twice."""

from __future__ import annotations

import asyncio

import pytest

from rbee.common.errors import TooManyRequests, Unavailable
from rbee.worker.slots import SlotPool


async def test_n_requests_run_at_once_and_the_next_waits_in_line() -> None:
    pool = SlotPool(["a", "b"], queue_size=1)
    first, second = await pool.acquire(), await pool.acquire()
    assert {first, second} == {"a", "b"}
    assert pool.full
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    assert pool.waiting == 1
    pool.release(first)
    assert await waiter == first
    assert pool.in_flight == 2


async def test_past_the_queue_the_answer_is_429_with_retry_after() -> None:
    pool = SlotPool(["a"], queue_size=1)
    await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    with pytest.raises(TooManyRequests) as caught:
        await pool.acquire()
    assert caught.value.status_code == 429
    assert int(caught.value.headers["Retry-After"]) >= 1
    waiter.cancel()


async def test_waiters_are_served_first_come_first_served() -> None:
    pool = SlotPool(["a"], queue_size=3)
    held = await pool.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        item = await pool.acquire()
        order.append(n)
        pool.release(item)

    tasks = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    pool.release(held)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert pool.idle


async def test_a_waiter_that_gives_up_does_not_lose_the_slot() -> None:
    pool = SlotPool(["a"], queue_size=2)
    held = await pool.acquire()
    quitter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    quitter.cancel()
    pool.release(held)
    await asyncio.gather(quitter, return_exceptions=True)
    assert pool.idle
    assert await pool.acquire() == "a"


async def test_closed_pool_refuses_new_requests_with_503() -> None:
    pool = SlotPool(["a"], queue_size=2)
    pool.close()
    with pytest.raises(Unavailable):
        await pool.acquire()


async def test_in_flight_changes_are_reported() -> None:
    counts: list[int] = []
    pools: list[SlotPool[str]] = []
    pool = SlotPool(["a", "b"], queue_size=0, on_change=lambda: counts.append(pools[0].in_flight))
    pools.append(pool)
    a = await pool.acquire()
    b = await pool.acquire()
    pool.release(a)
    pool.release(b)
    assert counts == [1, 2, 1, 0]
    assert await pool.wait_idle(0.1)
