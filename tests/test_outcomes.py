"""taskfarm._outcomes without MPI: durable before resolved, one event and one
journal record per outcome, and errors that load on the master or stand in."""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

import pytest

import taskfarm._serialization as ser
from taskfarm._errors import BrokenFarmError, RemoteTraceback, SerializationError
from taskfarm._future import FarmFuture, Outcome, PendingSet, start_unwatched, succeed_unwatched
from taskfarm._outcomes import Outcomes, decode_error
from taskfarm._protocol import PartResult, ResultItem

#: a wait that must end early is given this long
LONG = 10.0


class _Journal:
    """Records the calls the outcomes make, and what was resolved at each sync."""

    def __init__(self, futures: list[FarmFuture]) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._futures = futures

    def succeeded(self, key: str, **fields: Any) -> None:
        self.calls.append(("succeeded", key))

    def failed(self, key: str, **fields: Any) -> None:
        counts = fields.get("counts_as_attempt", True)  # the journal's default
        self.calls.append(("failed", (key, fields["final"], counts, fields["error_text"])))

    def sync(self) -> None:
        self.calls.append(("sync", [f.done() for f in self._futures]))


def _result(task_id: int, value: Any, *, ok: bool = True, traceback: str = "") -> ResultItem:
    payload, buffers = ser.dumps(value, "result")
    return ResultItem(task_id, 1, ok, payload, buffers, traceback, 10.0, 11.0, False)


def test_futures_resolve_only_after_the_journal_synced() -> None:
    futures = [FarmFuture(1), FarmFuture(2)]
    journal = _Journal(futures)
    outcomes = Outcomes(journal, [], lambda *a, **k: None)  # type: ignore[arg-type]
    outcomes.succeeded(futures[0], "k1", 3, 1, _result(1, "one"))
    outcomes.fail(futures[1], ValueError("two"))
    assert not any(f.done() for f in futures)  # nothing before the commit
    outcomes.commit()
    assert journal.calls == [("succeeded", "k1"), ("sync", [False, False])]  # durable first
    assert futures[0].result(0) == "one"
    assert isinstance(futures[1].exception(0), ValueError)
    outcomes.commit()  # nothing new: no second sync
    assert [c[0] for c in journal.calls].count("sync") == 1


def test_an_attempt_failed_is_one_event_and_one_record() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    listeners = [lambda event, fields: None]
    journal = _Journal([])
    outcomes = Outcomes(journal, listeners, lambda event, **fields: events.append((event, fields)))  # type: ignore[arg-type]
    part = PartResult(7, False, b"", (), "Traceback on rank 2", 1.0, 2.0)
    outcomes.attempt_failed("retried", "f", "k7", 2, 3, part, KeyError("x"), final=False, counts=True)
    assert journal.calls == [("failed", ("k7", False, True, "Traceback on rank 2"))]
    ((event, fields),) = events
    assert event == "retried"
    assert (fields["task"], fields["rank"], fields["attempt"], fields["label"]) == (7, 2, 3, "f")
    assert fields["error"] == "KeyError: 'x'" and fields["crashed"] is False


def test_no_events_are_built_without_listeners_and_no_records_without_a_key() -> None:
    built: list[str] = []
    journal = _Journal([])
    outcomes = Outcomes(journal, [], lambda event, **fields: built.append(event))  # type: ignore[arg-type]
    outcomes.succeeded(FarmFuture(1), None, 1, 1, _result(1, 0))
    outcomes.attempt_failed("failed", "f", None, 1, 1, _result(2, 0, ok=False), None, final=True, counts=True)
    assert built == [] and journal.calls == []


def test_decode_error_carries_the_remote_traceback() -> None:
    error = decode_error(_result(1, ValueError("bad"), ok=False, traceback="Traceback on rank 1 (host)"), 1)
    assert isinstance(error, ValueError) and isinstance(error.__cause__, RemoteTraceback)


def test_decode_error_stands_in_for_what_cannot_be_an_error_here() -> None:
    not_an_error = decode_error(_result(1, 42, ok=False), 5)
    assert isinstance(not_an_error, BrokenFarmError) and "rank 5" in str(not_an_error)
    garbage = ResultItem(2, 1, False, pickle.dumps(0)[:-1], (), "", 0.0, 0.0, False)  # truncated
    assert isinstance(decode_error(garbage, 1), SerializationError)


@pytest.mark.parametrize("cancelled", [False, True])
def test_commit_skips_futures_already_resolved_or_cancelled(cancelled: bool) -> None:
    future = FarmFuture(1)
    if cancelled:
        assert future.cancel()
    else:
        future.set_running_or_notify_cancel()
        future.set_result("first")
    outcomes = Outcomes(None, [], lambda *a, **k: None)
    outcomes.succeeded(future, None, 1, 1, _result(1, "second"))
    outcomes.fail(future, ValueError("late"))
    outcomes.commit()  # no InvalidStateError: the service thread must never die here
    assert future.cancelled() if cancelled else future.result(0) == "first"


def test_a_failure_decided_here_and_a_cancel_are_recorded_like_the_others() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    journal = _Journal([])
    outcomes = Outcomes(journal, [lambda e, f: None], lambda event, **fields: events.append((event, fields)))  # type: ignore[arg-type]
    lost = FarmFuture(4, label="g")
    outcomes.failed_here(lost, "k4", ValueError("input failed"))
    assert journal.calls == [("failed", ("k4", True, True, "ValueError: input failed"))]
    assert events == [
        (
            "failed",
            {"task": 4, "key": "k4", "label": "g", "rank": None, "error": "ValueError: input failed", "crashed": False},
        )
    ]
    assert not lost.done()  # the caller fails it (`fail`)
    gone = FarmFuture(5)
    assert gone.cancel()
    outcomes.cancelled(gone, None)  # no key: an event, no record
    assert events[-1][0] == "cancelled" and len(journal.calls) == 1
    assert gone._state == "CANCELLED_AND_NOTIFIED"  # wait() and as_completed() see it


def test_commit_says_whether_a_thread_waits_on_what_it_resolved() -> None:
    """The service thread yields the GIL after a commit that woke a thread
    waiting on a result: the rest of its round would hold that thread up."""
    futures = [FarmFuture(1), FarmFuture(2)]
    outcomes = Outcomes(None, [], lambda *a, **k: None)
    outcomes.succeeded(futures[0], None, 1, 1, _result(1, "one"))
    assert outcomes.commit() is False  # nobody waited
    assert outcomes.commit() is False  # nothing to commit
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(futures[1].result(LONG)))
    waiter.start()
    deadline = time.monotonic() + LONG
    while futures[1]._cond is None:  # the waiter has made the future's condition: it waits
        assert time.monotonic() < deadline, "the waiter never waited"
    outcomes.succeeded(futures[1], None, 2, 1, _result(2, "two"))
    assert outcomes.commit() is True
    waiter.join(LONG)
    assert got == ["two"]


def test_a_rounds_unwatched_successes_resolve_together_and_each_executor_forgets_its_own() -> None:
    """`Outcomes.commit` resolves the successes no thread waits on under one
    lock and lets each executor's `PendingSet` forget them in one go; a
    failure, and a future a thread waits on, go the usual way, and a future
    with callbacks of its own has them run after the executor's."""
    mine, theirs = PendingSet(), PendingSet()
    futures = [FarmFuture(i) for i in range(1, 6)]
    for i, future in enumerate(futures):
        future._on_done = mine if i % 2 == 0 else theirs
        (mine if i % 2 == 0 else theirs).futures.add(future)
    order: list[str] = []
    futures[4].add_done_callback(lambda f: order.append(f"own callback, pending: {f in mine.futures}"))
    watched = futures[2]
    assert watched._condition is not None  # a thread waits on it (`FarmFuture._condition`)
    outcomes = Outcomes(None, [], lambda *a, **k: None)
    for i, future in enumerate(futures):
        if i == 3:
            outcomes.fail(future, ValueError("four"))
        else:
            outcomes.succeeded_with(future, None, 1, 1, f"v{i}", 0.0, 1.0)
    assert outcomes.commit() is True  # the watched one
    assert [f.result(0) for f in (futures[0], futures[1], futures[2], futures[4])] == ["v0", "v1", "v2", "v4"]
    assert isinstance(futures[3].exception(0), ValueError)
    assert mine.futures == set() and theirs.futures == set()
    assert order == ["own callback, pending: False"]


def test_unwatched_helpers_leave_watched_cancelled_and_failed_futures_to_the_usual_path() -> None:
    free, watched, cancelled = FarmFuture(1), FarmFuture(2), FarmFuture(3)
    assert watched._condition is not None
    assert cancelled.cancel()
    start_unwatched([free, watched, cancelled])
    assert (free._state, watched._state, cancelled._state) == ("RUNNING", "PENDING", "CANCELLED")
    failed = FarmFuture(4)
    error = ValueError("x")
    outcomes: list[Outcome] = [(free, 1, None), (watched, 2, None), (failed, None, error), (cancelled, 3, None)]
    resolved, rest = succeed_unwatched(outcomes)
    assert resolved == [free] and free.result(0) == 1
    # in their order; cancel() made the cancelled one's condition
    assert rest == [(watched, 2, None), (failed, None, error), (cancelled, 3, None)]
    assert not watched.done() and not failed.done() and cancelled.cancelled()
