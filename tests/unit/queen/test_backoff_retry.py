"""The rules for retrying a request and for holding back worker starts, on a fake clock."""

from __future__ import annotations

import pytest

from rbee.contracts.hives import HiveHeartbeat, HiveInfo
from rbee.queen.hives import HiveRegistry
from rbee.queen.routing.retry import Outcome, Step, classify, next_step
from rbee.queen.scheduler.backoff import StartBackoff, delay_after
from rbee_testing.clock import FakeClock


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, Outcome.ANSWERED), (400, Outcome.ANSWERED), (404, Outcome.ANSWERED),
     (429, Outcome.FULL), (500, Outcome.FAILED), (503, Outcome.FAILED)],
)  # fmt: skip
def test_status_codes_are_classified(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_an_answer_is_relayed_and_a_full_worker_overflows_without_counting() -> None:
    assert next_step(Outcome.ANSWERED, 0, retries=0) is Step.RELAY
    assert next_step(Outcome.FULL, 0, retries=0) is Step.OVERFLOW


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.GONE])
def test_failures_retry_until_the_budget_is_spent(outcome: Outcome) -> None:
    assert [next_step(outcome, n, retries=2) for n in (1, 2, 3)] == [
        Step.RETRY,
        Step.RETRY,
        Step.GIVE_UP,
    ]
    assert next_step(outcome, 1, retries=0) is Step.GIVE_UP


def test_delay_is_free_once_then_doubles_up_to_the_cap() -> None:
    assert [delay_after(n, base_s=5, cap_s=60) for n in range(7)] == [0, 0, 5, 10, 20, 40, 60]
    assert delay_after(10_000, base_s=5, cap_s=60) == 60


def test_a_crash_loop_is_held_per_model_and_hive_and_released_in_time() -> None:
    clock = FakeClock()
    backoff = StartBackoff(base_s=5, cap_s=60, clock=clock)
    backoff.failed("m", "h1", "start failed: boom")
    assert backoff.hold("m", "h1") is None, "one failure is retried at once"
    hold = backoff.failed("m", "h1", "start failed: boom again")
    assert backoff.hold("m", "h1") == hold
    assert hold.failures == 2
    assert hold.reason == "start failed: boom again"
    assert backoff.held_hives("m") == {"h1"}
    assert backoff.hold("m", "h2") is None, "another hive is not held"
    assert backoff.hold("other", "h1") is None, "another model is not held"
    clock.advance(4.9)
    assert backoff.remaining_s(hold) == pytest.approx(0.1)
    clock.advance(0.1)
    assert backoff.hold("m", "h1") is None
    third = backoff.failed("m", "h1", "again")
    assert third.until - clock() == 10, "the count survives an expired hold"


def test_an_early_death_is_a_failure_and_a_stable_run_clears_the_record() -> None:
    clock = FakeClock()
    backoff = StartBackoff(base_s=5, cap_s=60, stable_after_s=60, clock=clock)
    ready_at = clock()
    backoff.failed("m", "h1", "start failed")
    clock.advance(10)
    early = backoff.worker_ended("m", "h1", ready_at, "died 10s after ready")
    assert early is not None
    assert early.failures == 2
    assert backoff.holds("m") == [early]
    clock.advance(100)
    assert backoff.worker_ended("m", "h1", clock() - 61, "died after a long run") is None
    assert backoff.failed("m", "h1", "x").failures == 1, "the stable run reset the count"


def test_holds_are_listed_soonest_first() -> None:
    clock = FakeClock()
    backoff = StartBackoff(base_s=5, cap_s=60, clock=clock)
    for _ in range(3):
        backoff.failed("m", "slow", "x")
    for _ in range(2):
        backoff.failed("m", "fast", "x")
    assert [h.hive_id for h in backoff.holds("m")] == ["fast", "slow"]


def hive_beat(hive_id: str) -> HiveHeartbeat:
    return HiveHeartbeat(hive=HiveInfo(id=hive_id, url=f"http://{hive_id}:7835", version="1"))


def test_a_silent_hive_goes_offline_then_is_forgotten_and_can_rejoin() -> None:
    clock = FakeClock()
    hives = HiveRegistry(timeout_s=10, clock=clock, forget_after_s=60)
    hives.update(hive_beat("h1"))
    clock.advance(11)
    assert [h.online for h in hives.all()] == [False]
    assert hives.online() == []
    assert hives.remove_forgotten() == []
    clock.advance(50)
    assert hives.remove_forgotten() == ["h1"]
    assert hives.all() == []
    assert hives.update(hive_beat("h1")) is True, "a forgotten hive registers again"
    assert hives.online()[0].id == "h1"


def test_the_grace_period_is_never_shorter_than_the_timeout() -> None:
    assert HiveRegistry(timeout_s=90, forget_after_s=5).forget_after_s == 90
