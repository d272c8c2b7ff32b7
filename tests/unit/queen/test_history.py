"""The queen's last hour for the dashboard's charts: bounded, oldest first, an hour deep."""

from __future__ import annotations

from rbee.queen.history import MAX_SAMPLES, History


def sample(t: float) -> dict[str, float]:
    return {"t": t, "tokens_per_s": t}


def test_an_hour_of_ten_second_samples_and_no_more() -> None:
    history = History(interval_s=10)
    for i in range(1000):
        history.add(sample(i * 10.0))
    kept = history.view()["samples"]
    assert kept[-1]["t"] == 9990.0
    assert kept[0]["t"] >= 9990.0 - 3600
    assert len(kept) == 361


def test_samples_older_than_the_window_fall_off_even_when_they_came_late() -> None:
    history = History(interval_s=1, window_s=60)
    history.add(sample(0.0))
    history.add(sample(30.0))
    history.add(sample(100.0))  # the queen was paused: the first two are over a minute old
    assert [s["t"] for s in history.view()["samples"]] == [100.0]


def test_a_tiny_interval_is_still_bounded() -> None:
    history = History(interval_s=0.01)
    for i in range(MAX_SAMPLES + 500):
        history.add(sample(i * 0.01))
    assert len(history.view()["samples"]) == MAX_SAMPLES
