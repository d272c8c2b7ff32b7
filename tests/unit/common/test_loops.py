"""Background loops under `supervise`: a failure is logged, counted and the loop goes on."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import generate_latest

from rbee.common.loops import LoopErrors, supervise
from rbee.common.metrics import new_registry


async def test_a_loop_that_raises_is_logged_counted_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = new_registry()
    errors = LoopErrors(registry)
    runs = 0
    finished = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise OverflowError("date value out of range")
        finished.set()
        await asyncio.Event().wait()  # a loop: it runs until cancelled

    with caplog.at_level(logging.ERROR, logger="rbee.loops"):
        task = asyncio.create_task(supervise("cleanup", flaky, errors, first_pause_s=0.01))
        await asyncio.wait_for(finished.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert runs == 3
    assert errors.count("cleanup") == 2
    text = generate_latest(registry).decode()
    assert 'rbee_background_errors_total{loop="cleanup"} 2.0' in text
    failures = [r for r in caplog.records if "'cleanup' failed" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info and r.exc_info[0] is OverflowError for r in failures)


async def test_a_loop_shows_zero_errors_before_it_ever_fails() -> None:
    registry = new_registry()
    errors = LoopErrors(registry)
    task = asyncio.create_task(supervise("offline", asyncio.Event().wait, errors))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert 'rbee_background_errors_total{loop="offline"} 0.0' in generate_latest(registry).decode()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_loop_that_returns_is_not_started_again() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    await asyncio.wait_for(supervise("once", once), 30)
    assert runs == 1
