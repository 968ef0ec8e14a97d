"""FarmFuture on its own (no MPI): it builds its own, lighter condition, so
check that it still behaves as a `concurrent.futures.Future` everywhere the
standard library reaches into a future's insides (``wait``, ``as_completed``)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

from taskfarm._future import FarmFuture

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
    plain = vars(cf.Future())
    ours = vars(FarmFuture(1))
    assert set(plain) <= set(ours)
    for name, value in plain.items():
        if name != "_condition":
            assert ours[name] == value, name


@pytest.mark.timeout(10)
def test_result_blocks_until_another_thread_sets_it() -> None:
    future = FarmFuture(1)
    thread = _later(lambda: future.set_result(42))
    assert future.result(timeout=5) == 42
    thread.join()


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
def test_wait_and_as_completed() -> None:
    futures = [FarmFuture(i) for i in range(3)]
    done, not_done = cf.wait(futures, timeout=0.01)
    assert not done and len(not_done) == 3
    threads = [_later(lambda f=f, i=i: f.set_result(i)) for i, f in enumerate(futures)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=5)) == [0, 1, 2]
    done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
    assert done
    for thread in threads:
        thread.join()


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
