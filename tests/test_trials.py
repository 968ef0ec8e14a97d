"""`taskfarm._trials.Trial` on its own (no MPI): two ways take turns until
each is timed, then the faster is kept."""

from __future__ import annotations

from taskfarm._trials import Trial


def test_the_ways_take_turns_until_each_is_timed() -> None:
    trial = Trial(3)
    ways = [trial.choose() for _ in range(6)]
    assert ways == [True, False, True, False, True, False]
    for way in ways:
        assert trial.decided is None
        trial.record(way, 2.0 if way else 1.0)
    assert trial.decided is False  # the lower median
    assert [trial.choose() for _ in range(4)] == [False] * 4


def test_the_median_decides_not_one_slow_round_trip() -> None:
    trial = Trial(3)
    for seconds in (1.0, 1.0, 9.0):  # one outlier among the early ring's timings
        trial.record(True, seconds)
    for seconds in (1.5, 1.5, 1.5):
        trial.record(False, seconds)
    assert trial.decided is True


def test_a_tie_keeps_the_first_way_and_later_timings_change_nothing() -> None:
    trial = Trial(2)
    for way in (True, False, True, False):
        trial.record(way, 1.0)
    assert trial.decided is True
    for _ in range(10):
        trial.record(True, 100.0)
    assert trial.decided is True and trial.choose() is True


def test_extra_timings_of_one_way_wait_for_the_other() -> None:
    trial = Trial(2)
    for _ in range(5):
        trial.record(True, 1.0)
    assert trial.decided is None
    trial.record(False, 0.5)
    assert trial.decided is None
    trial.record(False, 0.5)
    assert trial.decided is False
