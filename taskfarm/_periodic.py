"""Periodic tasks: `FarmExecutor.every` (Celery beat's job, inside the farm).

Two parts:

* `PeriodicSchedule`, a pure state machine: when does the next run start,
  given the interval, start, stop, the time now (passed in, never read) and
  whether the previous run is still going.  Unit tests drive it with a fake
  clock.
* `PeriodicTask`, the handle ``every`` returns: a thread on rank 0 that asks
  the schedule when to submit, submits one run at a time as an ordinary farm
  task, and streams the results to a callback and/or an iterator.

The rules:

* Runs are due on a grid of *ticks* ``start + k * interval`` (k = 0, 1, ...);
  ``start`` defaults to now, so the first run is at once.
* Never two runs of one periodic task at once: the next run is submitted only
  after the previous one finished (succeeded, failed or was cancelled).
* Missed ticks are skipped, never piled up.  A run that was still going (or
  still queued behind other work) at a tick covers that tick: the next run is
  at the first tick at or after the moment the previous run finished.  If the
  schedule itself is late (rank 0 busy), the overdue ticks collapse into one
  run, at once.  `skipped` counts the ticks left out.
* No run starts at or after ``stop``; a run going at ``stop`` finishes.
* A failed run does not stop the schedule.
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import BrokenFarmError
from ._signals import start_thread
from ._task import Task, wall_time_of

if TYPE_CHECKING:
    from ._executor import FarmExecutor
    from ._future import FarmFuture

log = logging.getLogger("taskfarm.periodic")

__all__ = ["PeriodicSchedule", "PeriodicTask"]

#: results kept for the iterator when nobody reads them; older ones are dropped
DEFAULT_BACKLOG = 1000
#: times this close (seconds) count as equal: ``0.1 * 3`` is a tick at 0.3
_EPS = 1e-9
#: while waiting for a tick, look this often (seconds) whether the farm is ending
_FARM_CHECK = 0.5
#: a start/stop given as a number below this is a duration, not a Unix time: refused
_EPOCH_FLOOR = 1e9


class PeriodicSchedule:
    """When the runs of one periodic task start.  Pure: every time is passed in.

    Times are seconds on one clock (the glue uses ``time.monotonic``).  The
    caller loops: wait until `next_run`, call `poll` (True: submit a run
    now), and call `run_finished` when that run ended.
    """

    def __init__(self, interval: float, start: float, stop: float | None = None) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        self.interval = float(interval)
        self.start = float(start)
        self.stop = None if stop is None else float(stop)
        #: index of the next tick that may start a run
        self._next = 0
        self._over = False  # ``stop`` passed
        #: a run was submitted and has not finished
        self.running = False
        self.cancelled = False
        #: runs started so far
        self.runs = 0
        #: ticks left out because a run was going, or the schedule was late
        self.skipped = 0
        #: the tick the current (or last) run was started for
        self.last_tick: float | None = None

    def tick(self, index: int) -> float:
        """The time of tick ``index``."""
        return self.start + index * self.interval

    def next_run(self) -> float | None:
        """When the next run is due; None while a run is going, or once none will start."""
        if self.cancelled or self.running or self._over:
            return None
        due = self.tick(self._next)
        if self.stop is not None and due >= self.stop - _EPS:
            return None
        return due

    @property
    def finished(self) -> bool:
        """True when no run is going and none will start any more."""
        return not self.running and self.next_run() is None

    def poll(self, now: float) -> bool:
        """True if a run starts now; the caller then submits it and later calls `run_finished`."""
        if self.cancelled or self.running or self._over:
            return False
        if self.stop is not None and now >= self.stop - _EPS:
            end = self._first_at_or_after(self.stop)
            self.skipped += max(0, end - self._next)
            self._next = max(self._next, end)
            self._over = True
            return False
        due = self.next_run()
        if due is None or now < due - _EPS:
            return False
        # ticks that passed while nobody was looking collapse into this run
        latest = max(self._next, self._last_at_or_before(now))
        self.skipped += latest - self._next
        self._next = latest + 1
        self.last_tick = self.tick(latest)
        self.running = True
        self.runs += 1
        return True

    def run_finished(self, now: float) -> None:
        """The run started by the last `poll` ended at ``now``: ticks it outlasted are skipped."""
        if not self.running:
            return
        self.running = False
        following = self._first_at_or_after(now)
        if self.stop is not None:
            following = min(following, self._first_at_or_after(self.stop))
        if following > self._next:
            self.skipped += following - self._next
            self._next = following

    def cancel(self) -> None:
        """No run starts from now on (a run going may finish)."""
        self.cancelled = True

    def _first_at_or_after(self, t: float) -> int:
        """The smallest tick index whose time is >= t (within `_EPS`)."""
        i = max(0, math.ceil((t - self.start) / self.interval))
        while i > 0 and self.tick(i - 1) >= t - _EPS:  # float rounding
            i -= 1
        while self.tick(i) < t - _EPS:
            i += 1
        return i

    def _last_at_or_before(self, t: float) -> int:
        """The largest tick index whose time is <= t (within `_EPS`; t >= start)."""
        i = self._first_at_or_after(t)
        return i if self.tick(i) <= t + _EPS else i - 1


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


#: the periodic tasks of each executor, so that its shutdown stops them
_registry: weakref.WeakKeyDictionary[Any, set[PeriodicTask]] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _monotonic_of(when: _dt.datetime | float, what: str) -> float:
    wall = wall_time_of(when)
    assert wall is not None
    if not isinstance(when, _dt.datetime) and wall < _EPOCH_FLOOR:
        raise ValueError(
            f"{what}={when!r} looks like a duration: {what} is a time (a datetime or Unix seconds, "
            f"e.g. time.time() + {when!r})"
        )
    return time.monotonic() + (wall - time.time())


class PeriodicTask:
    """A task run every ``interval`` seconds while the farm runs; `FarmExecutor.every` makes one.

    Each run is an ordinary farm task (its `Task` options apply: priority,
    time_limit, retries...), submitted by a thread on rank 0 when it is due.
    Successful results go to ``on_result(value)`` and to the iterator
    (``for value in handle``), in run order; failures go to
    ``on_error(exception)`` (or are logged) and are raised by the iterator,
    which ends there (iterate again to go on).  Callbacks run on the handle's
    thread, never on the farm's service thread.  Runs are not journaled: on
    ``--resume`` they simply run again on their schedule.
    """

    def __init__(
        self,
        executor: FarmExecutor,
        interval: float,
        task: Task,
        *,
        start: _dt.datetime | float | None = None,
        stop: _dt.datetime | float | None = None,
        on_result: Callable[[Any], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        now = time.monotonic()
        self.schedule = PeriodicSchedule(
            interval,
            now if start is None else _monotonic_of(start, "start"),
            None if stop is None else _monotonic_of(stop, "stop"),
        )
        self.task = task
        self.label = task.label or getattr(task.fn, "__name__", "task")
        self._executor = executor
        self._on_result = on_result
        self._on_error = on_error
        self._cond = threading.Condition()
        self._future: FarmFuture | None = None
        self._results: collections.deque[Any] = collections.deque(maxlen=max(1, backlog))
        self._ended = False
        #: runs that succeeded / failed
        self.succeeded = 0
        self.failed = 0
        #: results dropped from the iterator's backlog because nobody read them
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name=f"taskfarm-every-{self.label}", daemon=True)

    # -- the user's side -------------------------------------------------------
    def start(self) -> PeriodicTask:
        with _registry_lock:
            _registry.setdefault(self._executor, set()).add(self)
        start_thread(self._thread)
        return self

    def cancel(self) -> None:
        """Start no more runs; a run not yet dispatched is cancelled, a running one finishes."""
        with self._cond:
            self.schedule.cancel()
            future = self._future
            self._cond.notify_all()
        if future is not None:
            future.cancel()

    def cancelled(self) -> bool:
        return self.schedule.cancelled

    def done(self) -> bool:
        """True once no run is going and none will start (cancelled, stopped, farm ended)."""
        return self._ended

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until `done`; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._ended, timeout)

    @property
    def runs(self) -> int:
        """Runs started so far."""
        return self.schedule.runs

    @property
    def skipped(self) -> int:
        """Ticks skipped because the previous run was still going (or rank 0 was late)."""
        return self.schedule.skipped

    @property
    def interval(self) -> float:
        return self.schedule.interval

    def __iter__(self) -> Iterator[Any]:
        """The results, as runs finish; ends when the periodic task is done."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._results) or self._ended)
                if not self._results:
                    return
                item = self._results.popleft()
            if type(item) is _Failed:
                raise item.error
            yield item

    def __repr__(self) -> str:
        state = "done" if self._ended else ("cancelled" if self.cancelled() else "active")
        return (
            f"<PeriodicTask {self.label} every {self.interval:g} s {state}: "
            f"{self.runs} runs, {self.skipped} skipped>"
        )

    # -- the handle's thread ----------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._next_run():
                future = self._submit()
                if future is None:
                    return
                future.add_done_callback(self._wake)
                with self._cond:
                    # done() is True at once for a cancelled run (wait() would see it only once
                    # the farm acknowledged the cancel)
                    self._cond.wait_for(future.done)
                    self.schedule.run_finished(time.monotonic())
                    self._future = None
                self._deliver(future)
        except BaseException:
            log.exception("periodic task %s stopped", self.label)
        finally:
            with self._cond:
                self.schedule.cancel()
                self._ended = True
                self._cond.notify_all()
            with _registry_lock:
                _registry.get(self._executor, set()).discard(self)

    def _wake(self, future: Any = None) -> None:
        with self._cond:
            self._cond.notify_all()

    def _next_run(self) -> bool:
        """Wait until a run is due; False when none will start any more."""
        with self._cond:
            while not self.schedule.poll(time.monotonic()):
                if self.schedule.finished or self._farm_ending():
                    return False
                due = self.schedule.next_run()
                delay = _FARM_CHECK if due is None else min(_FARM_CHECK, max(0.0, due - time.monotonic()))
                self._cond.wait(delay)
            return True

    def _farm_ending(self) -> bool:
        farm = self._executor._farm
        return bool(self._executor._shutdown or farm._closing or farm._stopped or farm.broken is not None)

    def _submit(self) -> FarmFuture | None:
        executor = self._executor
        task = self.task
        try:
            if self._farm_ending():
                raise RuntimeError("the farm is ending")
            future = executor._submit(task.fn, task.args, task.kwargs, task, journal=False)
        except (RuntimeError, BrokenFarmError):
            with self._cond:
                self.schedule.run_finished(time.monotonic())
            return None  # the farm ends: so does the schedule
        with self._cond:
            self._future = future
            if self.schedule.cancelled:
                future.cancel()
        return future

    def _deliver(self, future: FarmFuture) -> None:
        if future.cancelled():
            return
        error = future.exception()
        item: Any
        if error is None:
            self.succeeded += 1
            item = future.result()
            callback: Callable[[Any], object] | None = self._on_result
        else:
            self.failed += 1
            item = _Failed(error)
            callback = self._on_error
            if callback is None:
                log.warning("periodic task %s failed: %r", self.label, error)
        with self._cond:
            if len(self._results) == self._results.maxlen:
                self.dropped += 1
            self._results.append(item)
            self._cond.notify_all()
        if callback is not None:
            try:
                callback(error if error is not None else item)
            except Exception:
                log.exception("callback of periodic task %s failed", self.label)


def stop_all(executor: FarmExecutor, wait: bool) -> None:
    """Cancel the periodic tasks of ``executor``; with ``wait``, until their last runs ended."""
    with _registry_lock:
        handles = list(_registry.get(executor, ()))
    for handle in handles:
        handle.cancel()
    if wait:
        for handle in handles:
            if handle._thread is not threading.current_thread():
                handle._thread.join()
