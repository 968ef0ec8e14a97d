"""FarmFuture on its own (no MPI): it builds its own, lighter condition, so
check that it still behaves as a `concurrent.futures.Future` everywhere the
standard library reaches into a future's insides (``wait``, ``as_completed``)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

from taskfarm import _future
from taskfarm import _serialization as ser
from taskfarm._future import FarmFuture, _Encoded
from taskfarm._task import TaskState

#: how long a helper thread waits before resolving a future (seconds)
DELAY = 0.05


def _later(action: object) -> threading.Thread:
    def run() -> None:
        time.sleep(DELAY)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_has_every_attribute_a_plain_future_has() -> None:
    ours = FarmFuture(1)
    for name, value in vars(cf.Future()).items():
        mine = getattr(ours, name)
        if name == "_condition":
            assert isinstance(mine, threading.Condition)
        elif isinstance(value, list):  # made on first use: empty until then
            assert list(mine) == value, name
        else:
            assert mine == value, name


def test_a_future_nobody_waits_on_makes_no_condition_or_lists() -> None:
    """The farm's own path (dispatch, result, the executor's callback) and the
    reads of a done future leave it one object for the garbage collector."""
    future = FarmFuture(1)
    forgotten: list[cf.Future[object]] = []
    future._on_done = forgotten.append
    assert not future.running() and future._start() and future.running()
    assert future._succeed(7) and not future._succeed(8)
    assert future.done() and not future.cancelled() and future.exception() is None
    assert future.result() == 7 and future.state is TaskState.SUCCESS
    assert forgotten == [future]
    assert future._cond is None and future._waiter_list is None and future._done_callbacks == ()


#: the standard way to resolve a future, and the farm's own (`FarmFuture._succeed`)
RESOLVERS = ["set_result", "_succeed"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_result_blocks_until_another_thread_sets_it(resolver: str) -> None:
    future = FarmFuture(1)
    thread = _later(lambda: getattr(future, resolver)(42))
    assert future.result(timeout=5) == 42
    thread.join()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_a_thread_asleep_in_result_is_woken(resolver: str) -> None:
    """No timeout to fall back on: only the resolution's notify can end the wait."""
    future = FarmFuture(1)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(future.result()), daemon=True)
    waiter.start()
    while future._cond is None or not future._cond._queue:  # until it waits on the condition
        time.sleep(0.001)
    getattr(future, resolver)(42)
    waiter.join(5)
    assert got == [42] and not future._cond._queue


@pytest.mark.timeout(10)
def test_result_timeout_and_exception() -> None:
    future = FarmFuture(1)
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.01)
    future.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        future.result()
    assert isinstance(future.exception(0), KeyError)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_wait_and_as_completed(resolver: str) -> None:
    futures = [FarmFuture(i) for i in range(3)]
    done, not_done = cf.wait(futures, timeout=0.01)
    assert not done and len(not_done) == 3
    threads = [_later(lambda f=f, i=i: getattr(f, resolver)(i)) for i, f in enumerate(futures)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=5)) == [0, 1, 2]
    done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
    assert done
    for thread in threads:
        thread.join()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_the_main_threads_waits_are_sliced_and_other_threads_are_not(
    resolver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wait`` and ``as_completed`` sleep on their waiter's event: one the
    main thread installs is a `_SlicedEvent` (so a signal handler runs while
    it waits), and it still wakes, and times out, as the plain one does."""
    monkeypatch.setattr(_future, "MAIN_THREAD_WAIT_SLICE", 0.01)
    naps: list[tuple[bool, float | None]] = []  # (a sliced event's, timeout)
    plain_wait = threading.Event.wait

    def counted(self: threading.Event, timeout: float | None = None) -> bool:
        naps.append((type(self) is _future._SlicedEvent, timeout))
        return plain_wait(self, timeout)

    monkeypatch.setattr(threading.Event, "wait", counted)
    futures = [FarmFuture(i) for i in range(2)]
    t0 = time.monotonic()
    assert not cf.wait(futures, timeout=0.1).done
    assert time.monotonic() - t0 >= 0.1
    assert len(naps) >= 5 and all(sliced and nap is not None and nap <= 0.01 for sliced, nap in naps), naps
    thread = _later(lambda: getattr(futures[0], resolver)(0))
    naps.clear()
    assert [f.result() for f in cf.as_completed(futures[:1], timeout=5)] == [0]
    thread.join()
    assert naps and all(sliced and nap is not None and nap <= 0.01 for sliced, nap in naps), naps
    # another thread's waiter sleeps on the plain event, in one piece
    other = threading.Thread(target=lambda: cf.wait(futures[1:], timeout=0.05))
    naps.clear()
    other.start()  # its own wait for the thread to start is a plain one too
    other.join()
    assert (False, 0.05) in naps and not any(sliced for sliced, _ in naps), naps


@pytest.mark.timeout(10)
def test_cancel_callbacks_and_notify() -> None:
    future = FarmFuture(1)
    seen: list[bool] = []
    future.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert future.cancel()
    assert seen == [True]
    assert not future.set_running_or_notify_cancel()
    assert cf.wait([future], timeout=1).done == {future}
    running = FarmFuture(2)
    assert running.set_running_or_notify_cancel()
    assert not running.cancel()


def test_state_names_are_the_standard_librarys() -> None:
    """The service thread reads a future's ``_state`` without its lock and
    compares it with these names: they must be concurrent.futures' own."""
    from concurrent.futures import _base

    from taskfarm import _future

    assert (_future._PENDING, _future._RUNNING, _future._CANCELLED) == (_base.PENDING, _base.RUNNING, _base.CANCELLED)
    assert set(_future._RESOLVED) == {_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED, _base.FINISHED}


def test_the_farms_own_transitions_behave_as_the_standard_ones() -> None:
    """`_start` and `_succeed` take the lock themselves (the master's hot path):
    same states, callbacks and notifications as set_running_or_notify_cancel
    and set_result, and a resolved or cancelled future is left alone."""
    future = FarmFuture(1)
    seen: list[object] = []
    future.add_done_callback(lambda f: seen.append(f.result()))
    assert future._start() and future.running()
    assert future._succeed(5) and future.done() and future.result() == 5 and seen == [5]
    assert not future._succeed(6) and future.result() == 5 and seen == [5]  # resolved once
    cancelled = FarmFuture(2)
    assert cancelled.cancel()
    assert not cancelled._start()  # and its waiters are told, as set_running_or_notify_cancel does
    assert cancelled._state == "CANCELLED_AND_NOTIFIED" and cf.wait([cancelled], timeout=1).done == {cancelled}
    assert not cancelled._succeed(1) and cancelled.cancelled()
    encoded = FarmFuture(3)
    assert encoded._succeed(_Encoded(ser.dumps([1, 2], "result")))
    assert encoded.result() == [1, 2] and encoded.result() == [1, 2]  # decoded once, then kept
