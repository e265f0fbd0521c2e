"""The load tracker: a burst's arrival rate and the mean request sizes the policy sees."""

from __future__ import annotations

import pytest

from elasticserve.engine.load_tracker import LoadTracker


def test_load_tracker_rate_and_sizes():
    tracker = LoadTracker(window_s=5.0)
    for i in range(10):
        tracker.arrive(i * 0.1, prompt_tokens=20, max_tokens=100)
    assert tracker.rate(1.0) == pytest.approx(10.0)  # a burst from quiet: its own rate
    assert tracker.rate(3.0) == pytest.approx(10 / 3)  # its arrivals, over the time since
    assert tracker.rate(7.0) == 0.0
    for i in range(40):  # steady, 2 a second, from t = 10
        tracker.arrive(10 + i * 0.5, prompt_tokens=20, max_tokens=100)
    assert tracker.rate(29.75) == pytest.approx(2.0)  # 10 in the last 5 s window
    assert tracker.mean_output_tokens == pytest.approx(100)
    tracker.finish(10)
    assert tracker.mean_output_tokens == pytest.approx(10)  # observed lengths replace the guess
