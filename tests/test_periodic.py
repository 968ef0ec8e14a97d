"""Periodic tasks: the pure schedule on a fake clock, the handle's thread, and `every` under mpiexec."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run, wait_until

from taskfarm import Task
from taskfarm._periodic import PeriodicSchedule, PeriodicTask, stop_all


# -- the schedule, on a fake clock ------------------------------------------------
def simulate(
    schedule: PeriodicSchedule, duration: Callable[[int], float], until: float, step: float = 0.01
) -> list[tuple[float, float]]:
    """Drive ``schedule`` with a fake clock; runs take ``duration(run_index)``. Returns (start, end) of runs."""
    runs: list[tuple[float, float]] = []
    now = 0.0
    busy_until: float | None = None
    while now <= until:
        if busy_until is not None and now >= busy_until:
            schedule.run_finished(busy_until)
            busy_until = None
        if busy_until is None and schedule.poll(now):
            end = now + duration(len(runs))
            runs.append((now, end))
            busy_until = end
        now = round(now + step, 6)
    return runs


def test_first_run_is_at_start_then_every_interval() -> None:
    s = PeriodicSchedule(1.0, start=10.0)
    assert s.next_run() == 10.0
    assert not s.poll(9.99)
    assert s.poll(10.0) and s.running and s.runs == 1
    assert s.next_run() is None  # nothing is due while the run is going
    s.run_finished(10.2)
    assert s.next_run() == 11.0
    assert not s.poll(10.99)
    assert s.poll(11.0)
    assert s.skipped == 0


def test_never_two_runs_at_once() -> None:
    s = PeriodicSchedule(1.0, start=0.0)
    assert s.poll(0.0)
    for t in (1.0, 2.0, 3.5, 100.0):
        assert not s.poll(t), "a second run started while the first was going"
    assert s.runs == 1


def test_ticks_missed_during_a_long_run_are_skipped_not_piled_up() -> None:
    s = PeriodicSchedule(1.0, start=0.0)
    assert s.poll(0.0)
    s.run_finished(3.5)  # outlasted ticks 1, 2 and 3
    assert s.skipped == 3
    assert s.next_run() == 4.0  # the next tick on the grid, not a burst of catch-up runs
    assert not s.poll(3.5)
    assert s.poll(4.0)
    s.run_finished(4.1)
    assert s.poll(5.0) and s.runs == 3 and s.skipped == 3


def test_a_run_ending_exactly_on_a_tick_runs_at_that_tick() -> None:
    s = PeriodicSchedule(0.5, start=0.0)
    assert s.poll(0.0)
    s.run_finished(1.0)
    assert s.skipped == 1  # tick 0.5 was covered by the run
    assert s.next_run() == 1.0 and s.poll(1.0)


def test_a_late_scheduler_collapses_overdue_ticks_into_one_run() -> None:
    s = PeriodicSchedule(1.0, start=0.0)
    assert s.poll(0.0)
    s.run_finished(0.1)
    assert s.poll(5.5)  # rank 0 looked again only now: ticks 1..4 missed, 5 runs
    assert s.skipped == 4 and s.last_tick == 5.0
    s.run_finished(5.6)
    assert s.next_run() == 6.0


def test_stop_no_run_starts_at_or_after_it() -> None:
    s = PeriodicSchedule(1.0, start=0.0, stop=2.5)
    starts = [start for start, _ in simulate(s, lambda i: 0.1, until=10.0)]
    assert starts == [0.0, 1.0, 2.0]
    assert s.finished and s.next_run() is None


def test_stop_on_a_tick_excludes_that_tick() -> None:
    s = PeriodicSchedule(1.0, start=0.0, stop=2.0)
    assert [a for a, _ in simulate(s, lambda i: 0.1, until=5.0)] == [0.0, 1.0]


def test_a_run_going_at_stop_finishes_and_nothing_follows() -> None:
    s = PeriodicSchedule(1.0, start=0.0, stop=2.5)
    assert s.poll(0.0)
    assert not s.finished
    s.run_finished(7.0)
    assert s.finished and not s.poll(7.0) and s.runs == 1
    assert s.skipped == 2  # ticks 1 and 2 (tick 3 is past stop: not counted)


def test_late_past_stop_starts_nothing() -> None:
    s = PeriodicSchedule(1.0, start=0.0, stop=3.0)
    assert s.poll(0.0)
    s.run_finished(0.5)
    assert not s.poll(3.0)
    assert s.finished and s.skipped == 2


def test_stop_before_start_means_no_run() -> None:
    s = PeriodicSchedule(1.0, start=5.0, stop=5.0)
    assert s.finished and not s.poll(5.0)


def test_cancel_stops_future_runs_but_not_the_one_going() -> None:
    s = PeriodicSchedule(1.0, start=0.0)
    assert s.poll(0.0)
    s.cancel()
    assert not s.finished  # the running one still has to end
    s.run_finished(0.5)
    assert s.finished and not s.poll(1.0) and s.next_run() is None


def test_cancel_before_the_first_run() -> None:
    s = PeriodicSchedule(1.0, start=3.0)
    s.cancel()
    assert s.finished and not s.poll(3.0) and s.runs == 0


def test_fast_runs_keep_the_grid_exactly() -> None:
    s = PeriodicSchedule(0.25, start=0.0)
    starts = [start for start, _ in simulate(s, lambda i: 0.01, until=2.0)]
    assert starts == [0.25 * k for k in range(9)]
    assert s.skipped == 0


def test_slow_runs_no_overlap_and_start_on_grid_ticks() -> None:
    s = PeriodicSchedule(0.2, start=0.0)
    runs = simulate(s, lambda i: 0.45, until=3.0)
    for (_, end), (next_start, _) in itertools.pairwise(runs):
        assert next_start >= end, "runs overlap"
    for start, _ in runs:
        assert abs(start / 0.2 - round(start / 0.2)) < 1e-6, f"run at {start} is off the grid"
    # every run covers 3 ticks: one run, two skipped, per 0.6 s
    assert [a for a, _ in runs[:4]] == pytest.approx([0.0, 0.6, 1.2, 1.8])
    assert s.skipped == 2 * (len(runs) - 1)


def test_runs_never_exceed_the_ticks_elapsed_whatever_the_durations() -> None:
    durations = [0.05, 1.3, 0.0, 0.7, 2.2, 0.1, 0.1, 3.0, 0.01, 0.5] * 5
    s = PeriodicSchedule(0.5, start=0.0)
    runs = simulate(s, lambda i: durations[i % len(durations)], until=30.0)
    assert len(runs) <= 30.0 / 0.5 + 1
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(runs))
    # every tick is either run or skipped, none twice
    assert s.runs + s.skipped == s._next


def test_float_grids_do_not_drift() -> None:
    s = PeriodicSchedule(0.1, start=1000.0)
    starts = [start for start, _ in simulate(s, lambda i: 0.0, until=1.0)]  # clock never reaches start
    assert starts == []
    s = PeriodicSchedule(0.1, start=0.0)
    starts = [start for start, _ in simulate(s, lambda i: 0.0, until=10.0, step=0.1)]
    assert len(starts) == 101 and s.skipped == 0


@pytest.mark.parametrize("interval", [0, -1, float("inf"), float("nan")])
def test_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        PeriodicSchedule(interval, start=0.0)


# -- the handle's thread, over a fake executor -------------------------------------
class _FakeFarm:
    def __init__(self) -> None:
        self._closing = False
        self._stopped = False
        self.broken = None


class FakeExecutor:
    """What `PeriodicTask` uses of a FarmExecutor, over a thread pool (or a manual gate)."""

    def __init__(self, *, gate: threading.Event | None = None) -> None:
        self._farm = _FakeFarm()
        self._shutdown = False
        self._pool = concurrent.futures.ThreadPoolExecutor(4)
        self.gate = gate
        self.submitted: list[float] = []
        self.futures: list[concurrent.futures.Future[Any]] = []

    def _submit(self, fn: Any, args: Any, kwargs: Any, task: Task, *, journal: bool = True) -> Any:
        assert journal is False, "periodic runs must not be journaled"
        self.submitted.append(time.time())
        if self.gate is not None:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()  # never starts by itself
        else:
            future = self._pool.submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def fake() -> Any:
    executor = FakeExecutor()
    yield executor
    stop_all(executor, wait=True)  # type: ignore[arg-type]
    executor.close()


def periodic(executor: Any, interval: float, fn: Callable[..., Any], *args: Any, **options: Any) -> PeriodicTask:
    return PeriodicTask(executor, interval, Task(fn, args), **options).start()


def test_results_stream_to_callback_and_iterator_in_order(fake: Any) -> None:
    counter = iter(range(1000))
    got: list[int] = []
    handle = periodic(fake, 0.01, lambda: next(counter), on_result=got.append)
    seen = []
    for value in handle:
        seen.append(value)
        if len(seen) == 5:
            handle.cancel()
    assert handle.wait(5) and handle.done()
    assert seen[:5] == [0, 1, 2, 3, 4]
    assert got == seen  # the same values, in the same order, to both
    assert handle.succeeded == len(seen) and handle.runs in (len(seen), len(seen) + 1)


def test_no_overlap_and_skips_with_slow_runs(fake: Any) -> None:
    lock = threading.Lock()
    state = {"running": 0, "max": 0}

    def slow() -> None:
        with lock:
            state["running"] += 1
            state["max"] = max(state["max"], state["running"])
        time.sleep(0.05)
        with lock:
            state["running"] -= 1

    handle = periodic(fake, 0.01, slow)
    wait_until(lambda: handle.runs >= 4)
    handle.cancel()
    assert handle.wait(5)
    assert state["max"] == 1
    assert handle.skipped >= handle.runs - 1 >= 3  # each slow run covers several ticks


def test_cancel_cancels_a_queued_run_and_delivers_nothing() -> None:
    executor = FakeExecutor(gate=threading.Event())
    got: list[Any] = []
    handle = periodic(executor, 0.01, lambda: 1, on_result=got.append, on_error=got.append)
    wait_until(lambda: len(executor.futures) == 1)
    handle.cancel()
    assert handle.wait(5)
    assert executor.futures[0].cancelled() and got == [] and list(handle) == []
    assert len(executor.futures) == 1


def test_failures_go_to_on_error_and_the_iterator_and_the_schedule_goes_on(fake: Any) -> None:
    counter = iter(range(1000))

    def sometimes() -> int:
        n = next(counter)
        if n % 2:
            raise ValueError(f"odd {n}")
        return n

    errors: list[BaseException] = []
    handle = periodic(fake, 0.005, sometimes, on_error=errors.append)
    wait_until(lambda: handle.runs >= 5)
    handle.cancel()
    assert handle.wait(5)
    assert handle.failed >= 2 and handle.succeeded >= 2
    assert all(isinstance(e, ValueError) for e in errors) and len(errors) == handle.failed
    it = iter(handle)
    assert next(it) == 0
    with pytest.raises(ValueError, match="odd 1"):
        next(it)
    assert next(iter(handle)) == 2  # a new iteration goes on after the failure


def test_stop_ends_the_schedule_by_itself(fake: Any) -> None:
    stop = time.time() + 0.15
    handle = periodic(fake, 0.02, lambda: None, stop=stop)
    assert handle.wait(10), "a periodic task with stop= did not end"
    assert handle.runs >= 1
    # decided on the monotonic clock before stop; recorded a moment later on the wall clock
    assert all(t < stop + 0.005 for t in fake.submitted), "a run was submitted after stop"


def test_start_in_the_future_delays_the_first_run(fake: Any) -> None:
    start = time.time() + 0.2
    handle = periodic(fake, 0.05, lambda: None, start=start)
    wait_until(lambda: handle.runs >= 1)
    handle.cancel()
    assert fake.submitted[0] >= start - 0.01  # the monotonic/wall conversion may differ by a hair


def test_a_start_that_looks_like_a_duration_is_refused(fake: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        PeriodicTask(fake, 1.0, Task(time.time), start=5)
    with pytest.raises(ValueError, match="duration"):
        PeriodicTask(fake, 1.0, Task(time.time), stop=60.0)


def test_stop_all_cancels_and_joins(fake: Any) -> None:
    handles = [periodic(fake, 0.01, time.sleep, 0.02) for _ in range(3)]
    wait_until(lambda: all(h.runs >= 1 for h in handles))
    stop_all(fake, wait=True)
    assert all(h.done() and h.cancelled() for h in handles)


def test_the_schedule_ends_when_the_farm_ends(fake: Any) -> None:
    handle = periodic(fake, 3600.0, lambda: None)  # one run, then a long wait for the next tick
    wait_until(lambda: handle.runs == 1 and handle.succeeded == 1)
    fake._farm._closing = True
    assert handle.wait(5), "a periodic task kept waiting after its farm began to close"


def test_a_failing_callback_does_not_stop_the_schedule(fake: Any) -> None:
    def bad(value: Any) -> None:
        raise RuntimeError("callback bug")

    handle = periodic(fake, 0.005, lambda: 1, on_result=bad)
    wait_until(lambda: handle.succeeded >= 3)
    handle.cancel()


# -- under mpiexec --------------------------------------------------------------------
EVERY_SCRIPT = r"""
import json, os, sys, threading, time
import taskfarm
from taskfarm import Task

def stamp(tag):
    return (tag, os.getpid(), time.time())

def slow(seconds):
    start = time.time()
    time.sleep(seconds)
    return (start, time.time())

def busy(seconds):
    time.sleep(seconds)
    return seconds

out = {}
with taskfarm.FarmExecutor() as ex:
    # results stream through the iterator; cancel() ends it
    handle = ex.every(0.05, stamp, "it")
    values = []
    for v in handle:
        values.append(v)
        if len(values) == 5:
            handle.cancel()
            break
    out["iter"] = {"values": len(values), "done": handle.wait(10), "runs": handle.runs}

    # slow runs: never two at once, missed ticks skipped
    spans = []
    slow_h = ex.every(0.05, slow, 0.2, on_result=spans.append)
    while len(spans) < 4:
        time.sleep(0.02)
    slow_h.cancel()
    slow_h.wait(10)
    out["slow"] = {"spans": spans, "skipped": slow_h.skipped, "runs": slow_h.runs}

    # under load: every worker busy with a batch; the periodic task waits its turn
    # (priority) and its missed ticks are skipped, not piled up
    t0 = time.monotonic()
    stamps = []
    load_h = ex.every(0.05, Task(stamp, ("load",), priority=5), on_result=stamps.append)
    batch = [ex.submit(busy, 0.1) for _ in range(6 * ex.workers)]
    for f in batch:
        f.result()
    load_h.cancel()
    load_h.wait(10)
    elapsed = time.monotonic() - t0
    out["load"] = {"runs": load_h.runs, "elapsed": elapsed, "skipped": load_h.skipped, "n": len(stamps)}

    # stop= ends it by itself
    stop_h = ex.every(0.05, stamp, "stop", stop=time.time() + 0.3)
    out["stop"] = {"ended": stop_h.wait(10), "runs": stop_h.runs}

    # still active when the executor shuts down: shutdown cancels it
    ex.every(0.02, stamp, "left")
    out["threads_before_exit"] = sum(t.name.startswith("taskfarm-every") for t in threading.enumerate())
out["threads_after_shutdown"] = sum(t.name.startswith("taskfarm-every") for t in threading.enumerate())

# an executor never shut down: the end of `taskfarm run` must not hang on its periodic task
ex2 = taskfarm.FarmExecutor()
ex2.every(0.02, stamp, "orphan")
time.sleep(0.1)
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


@pytest.mark.mpi
def test_every_under_mpiexec(mpi: MPI, tmp_path: Path) -> None:
    script = tmp_path / "every.py"
    script.write_text(EVERY_SCRIPT)
    out = tmp_path / "out.json"
    farm_run(mpi, 3, ["run", "-q", str(script), str(out)], timeout=90)
    r = json.loads(out.read_text())
    it = r["iter"]
    assert it["values"] == 5 and it["done"] and it["runs"] in (5, 6)  # a 6th may have been due at cancel()
    spans = r["slow"]["spans"]
    assert len(spans) >= 4
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"two runs of one periodic task overlapped: {spans}"
    assert r["slow"]["skipped"] >= 2 * (r["slow"]["runs"] - 1)  # 0.2 s runs every 0.05 s: >= 3 ticks each
    load = r["load"]
    assert load["runs"] <= load["elapsed"] / 0.05 + 1, f"runs piled up: {load}"
    assert load["n"] == load["runs"] or load["n"] == load["runs"] - 1  # the last may have been cancelled
    assert r["stop"]["ended"] and r["stop"]["runs"] >= 1
    assert r["threads_before_exit"] == 1 and r["threads_after_shutdown"] == 0
