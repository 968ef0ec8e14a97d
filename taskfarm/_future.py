"""The future the farm hands out: a concurrent.futures.Future that knows its task.

Results arrive as serialized frames and are decoded on first ``result()`` in
the caller's thread, not on the master's service thread, so decoding big
results never delays dispatch.  A numpy result is rebuilt over the received
buffer without a copy.

A future is one object for the garbage collector, not five: its condition
(with its lock), its waiters' list and its callbacks' list are made when a
thread first needs them (`FarmFuture._condition`).  A burst of submits keeps
every future alive until its result, and the collector's full passes scan
them all: with the five, collecting took a quarter of the time of 50,000
no-op submits.  Most futures are only ever read through ``result()`` after
they are done, so most never get the other four.
"""

from __future__ import annotations

import _thread
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import _serialization as ser
from ._task import TaskState


class _Encoded:
    """A result still in wire form."""

    __slots__ = ("frame",)

    def __init__(self, frame: ser.Frame) -> None:
        self.frame = frame


_decode_lock = threading.Lock()
#: held while a future's condition is made, and while the master's service
#: thread moves a future that has none yet (see `FarmFuture._condition`)
_make_lock = threading.Lock()
#: the logger concurrent.futures reports failing done-callbacks to
_callback_log = logging.getLogger("concurrent.futures")

#: concurrent.futures' names of a future's states (its module keeps them private);
#: the service thread reads ``_state`` without the lock on its hot path
_PENDING = "PENDING"
_RUNNING = "RUNNING"
_CANCELLED = "CANCELLED"
_FINISHED = "FINISHED"
#: the states in which a future is resolved
_RESOLVED = (_CANCELLED, "CANCELLED_AND_NOTIFIED", _FINISHED)
#: longest the main thread sleeps at a time in ``result()``, ``exception()``,
#: `concurrent.futures.wait` and ``as_completed`` (seconds).  Python runs a signal's handler only when the
#: main thread runs: a drain signal (Slurm's SIGTERM) that the kernel handed
#: to another thread, one MPI started before taskfarm could block it there
#: (`taskfarm._signals`), would wait until the future resolved, and the drain
#: with it.  A wake-up every half second costs a few microseconds.
MAIN_THREAD_WAIT_SLICE = 0.5


class _FutureCondition(threading.Condition):
    """A future's condition: `threading.Condition` over its own `RLock`, as
    the standard library's, built without the five bound methods
    ``Condition.__init__`` stores on each instance.

    Each of those is an object the cyclic garbage collector tracks; with a
    deque and the condition itself that made a future's condition seven
    tracked objects, and collecting them was a third of the CPU of the
    thread that submits no-op tasks.  Here the same calls are class methods
    that delegate to the lock (they run rarely: ``with`` goes to the lock's
    own ``__enter__``/``__exit__``), and the deque of waiting threads is
    made by the first ``wait`` (most futures are never waited on while
    pending; a deque is also ~600 bytes).
    """

    #: the waiting threads' locks, once a thread has waited (see `_waiters`)
    _queue: collections.deque[Any] | None = None

    def __init__(self) -> None:  # not super().__init__(): see the class docstring
        self._lock = _thread.RLock()  # threading.RLock is a Python-level factory of this

    @property
    def _waiters(self) -> collections.deque[Any]:
        # Condition's methods use it only while holding the lock: made once
        queue = self._queue
        if queue is None:
            queue = self._queue = collections.deque()
        return queue

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]

    def notify_all(self) -> None:
        # a future is resolved once and mostly waited for by nobody: nothing
        # to do then.  Else Condition.notify_all's loop, inline: its notify,
        # _is_owned and _waiters are five Python calls run just before the
        # waiting thread can wake (the caller holds the lock, as there)
        queue = self._queue
        if queue:
            for waiter in tuple(queue):
                try:
                    waiter.release()
                except RuntimeError:  # released already: its wait timed out meanwhile
                    pass
            queue.clear()


def _slices(deadline: float | None) -> Iterator[float]:
    """A main thread's sleeps, each at most `MAIN_THREAD_WAIT_SLICE`, until
    ``deadline`` (`time.monotonic`; None: without end).  Its caller checks
    what it waits for before each."""
    while True:
        nap = MAIN_THREAD_WAIT_SLICE
        if deadline is not None:
            nap = min(nap, deadline - time.monotonic())
            if nap <= 0.0:
                return
        yield nap


class _SlicedEvent(threading.Event):
    """The event a `concurrent.futures.wait` or ``as_completed`` waiter
    sleeps on, when the main thread installed it on a `FarmFuture`: it
    waits in slices of `MAIN_THREAD_WAIT_SLICE`, as ``result()`` does, so
    that a signal's handler (a drain's SIGTERM that the kernel handed to
    another thread) runs while the main thread waits, not once a future
    resolves."""

    def wait(self, timeout: float | None = None) -> bool:
        for nap in _slices(None if timeout is None else time.monotonic() + timeout):
            if self.is_set():
                break
            super().wait(nap)
        return self.is_set()


class _Waiters(list):  # type: ignore[type-arg]  # of concurrent.futures' private waiter objects
    """A future's waiters (`concurrent.futures.wait`'s and ``as_completed``'s):
    one the main thread installs gets a `_SlicedEvent` to sleep on.  It is
    installed while the condition of every future it waits for is held, so
    no future can have set its event yet."""

    def append(self, waiter: Any) -> None:
        if type(waiter.event) is threading.Event and threading.current_thread() is threading.main_thread():
            sliced = _SlicedEvent()
            if waiter.event.is_set():
                sliced.set()
            waiter.event = sliced
        super().append(waiter)


class FarmFuture(concurrent.futures.Future[Any]):
    """A `concurrent.futures.Future` with the task's id, state and rank."""

    #: the master's: -1 while the call waits to be bundled, then its bundle's
    #: task id; 0 for a task of its own (see `taskfarm._bundles`)
    _bundle = 0
    #: made by the first thread that needs it (see `_condition`)
    _cond: _FutureCondition | None = None
    #: `concurrent.futures.wait` and `as_completed`'s waiters, once one came
    _waiter_list: list[Any] | None = None
    #: callbacks added by `add_done_callback` (a list once one was added)
    _done_callbacks: list[Callable[[FarmFuture], object]] | tuple[()] = ()
    #: the executor's own callback (it forgets the future), called first
    _on_done: Callable[[FarmFuture], object] | None = None
    # the fields below start as these class defaults, set on the instance only
    # when they change: a burst of submits builds a future each (fewer stores,
    # a smaller instance dictionary)
    _result: Any = None
    _exception: BaseException | None = None
    key: str | None = None
    _task_state = TaskState.PENDING
    #: the rank the task was last dispatched to
    rank: int | None = None
    _cancel_hook: Any = None
    #: the farm that runs the task (a future is an input only within it)
    _farm: Any = None

    def __init__(self, task_id: int, key: str | None = None, label: str = "") -> None:
        # Future.__init__'s fields, but not its condition and lists (see the
        # module docstring); not super().__init__(), which would make them
        self._state = _PENDING
        self.task_id = task_id
        if key is not None:
            self.key = key
        self.label = label

    @property
    def _condition(self) -> _FutureCondition:  # type: ignore[override]  # Future's attribute, made on first use
        """The future's condition, made on first use.

        Every thread that locks or waits on a future gets its condition here,
        and it is made under `_make_lock`.  So while the service thread holds
        that lock and finds no condition, no thread holds or waits on the
        future, and none can until it lets go: it may move the state without
        one (`_start`, `_succeed`), and there is nobody to notify.
        """
        cond = self._cond
        if cond is None:
            with _make_lock:
                cond = self._cond
                if cond is None:
                    cond = self._cond = _FutureCondition()
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]  # Future's attribute, made on first use
        # concurrent.futures reads and changes it only while holding the condition
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = _Waiters()
        return waiters

    @property
    def state(self) -> TaskState:
        """PENDING, SCHEDULED, RUNNING, RETRY, SUCCESS, FAILURE or CANCELLED."""
        if self.cancelled():
            return TaskState.CANCELLED
        if self.done():
            return TaskState.FAILURE if self.exception(0) is not None else TaskState.SUCCESS
        return self._task_state

    def cancel(self) -> bool:
        """Cancel the task if it has not been dispatched yet."""
        cancelled = super().cancel()
        if cancelled and self._cancel_hook is not None:
            self._cancel_hook(self.task_id)
        return cancelled

    def result(self, timeout: float | None = None) -> Any:
        if self._state not in _RESOLVED:
            timeout = self._wait(timeout)
        # a finished future never changes again, and its result is stored
        # before its state: read without the condition (Python-level methods)
        if self._state == _FINISHED and self._exception is None:
            value = self._result
        else:
            value = super().result(timeout)
        if type(value) is _Encoded:
            with _decode_lock:
                value = self._result
                if type(value) is _Encoded:
                    value = ser.loads(*value.frame)
                    self._result = value
        return value

    def done(self) -> bool:
        # the state is one attribute, read whole: no condition needed (or made)
        return self._state in _RESOLVED

    def cancelled(self) -> bool:
        return self._state in (_CANCELLED, "CANCELLED_AND_NOTIFIED")

    def running(self) -> bool:
        return self._state == _RUNNING

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:  # stored before the state, as for `result`
            return self._exception
        if self._state not in _RESOLVED:
            timeout = self._wait(timeout)
        return super().exception(timeout)

    def _wait(self, timeout: float | None) -> float | None:
        """The part of ``result()``'s and ``exception()``'s wait that is the
        farm's; returns the rest of ``timeout`` for `concurrent.futures`' own.
        On an idle farm the farm's only task is taken in this thread
        (`Farm.wait_here`); the main thread then waits in slices of
        `MAIN_THREAD_WAIT_SLICE`, so that a signal's handler runs.
        A wait in the thread that runs the farm's round (a done-callback's,
        a listener's) is refused: nothing else would resolve the future."""
        farm = self._farm
        if farm is not None:
            if (timeout is None or timeout > 0) and farm.resolves_here():
                raise RuntimeError(
                    f"waiting for task {self.task_id} in the thread that resolves the farm's futures "
                    "(a done-callback or an event listener): it would wait for good; "
                    "chain with add_done_callback, or wait in a thread of your own"
                )
            timeout = farm.wait_here(self, timeout)
        if (
            (timeout is None or timeout > 0.0)
            and self._state not in _RESOLVED
            and threading.current_thread() is threading.main_thread()
        ):
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._condition:
                for nap in _slices(deadline):
                    if self._state in _RESOLVED:
                        break
                    self._condition.wait(nap)
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        return timeout

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        with self._condition:
            if self._state not in _RESOLVED:
                if type(self._done_callbacks) is tuple:
                    self._done_callbacks = [fn]
                else:
                    self._done_callbacks.append(fn)  # type: ignore[union-attr]
                return
        self._call_back(fn)

    def _invoke_callbacks(self) -> None:
        # concurrent.futures calls this once the future is resolved
        if self._on_done is not None:
            self._on_done(self)
        for callback in self._done_callbacks:
            self._call_back(callback)

    def _call_back(self, fn: Callable[[FarmFuture], object]) -> None:
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - as concurrent.futures: logged, the others still run
            _callback_log.exception("exception calling callback for %r", self)

    def _start(self) -> bool:
        """``set_running_or_notify_cancel()`` for a pending future, taking the
        lock itself: the `Condition` methods ``with`` goes through are Python
        code, paid per call on the master's hot path; and a future no thread
        has locked yet needs no condition at all (see `_condition`)."""
        with _make_lock:
            if self._cond is None and self._state == _PENDING:
                self._state = _RUNNING
                return True
        with self._condition._lock:
            if self._state == _PENDING:
                self._state = _RUNNING
                return True
        return self.set_running_or_notify_cancel()  # cancelled meanwhile: notify its waiters

    def _succeed(self, value: Any) -> bool:
        """``set_result(value)`` (for the same reasons as `_start`); False, and
        nothing done, when already resolved (a cancel may race the result)."""
        with _make_lock:
            cond = self._cond
            if cond is None:  # nobody waits: nobody to notify
                if self._state in _RESOLVED:
                    return False
                self._result = value
                self._state = _FINISHED
        if cond is not None:
            with cond._lock:
                if self._state in _RESOLVED:
                    return False
                self._result = value
                self._state = _FINISHED
                for waiter in self._waiter_list or ():
                    waiter.add_result(self)
                cond.notify_all()
        self._invoke_callbacks()
        return True

    def encoded_result(self) -> ser.Frame | None:
        """The result in wire form while not yet decoded (to feed dependents)."""
        value = self._result
        return value.frame if type(value) is _Encoded else None

    def __reduce__(self) -> Any:
        # a future inside a task's arguments is an input: the executor pickles
        # the call again with a hook that sends a reference to its task instead
        raise ser.FutureInArguments(self.task_id)

    def __repr__(self) -> str:
        where = "" if self.rank is None else f" rank={self.rank}"
        return f"<FarmFuture task={self.task_id} {self.state.value}{where}>"


class PendingSet:
    """An executor's futures not yet resolved, which its ``shutdown`` waits
    for: each future's `FarmFuture._on_done`.  Called with one future, it
    forgets that one; `call_back_all` forgets a round's worth at once."""

    __slots__ = ("futures", "lock")

    def __init__(self) -> None:
        self.futures: set[FarmFuture] = set()
        self.lock = threading.Lock()

    def add(self, future: FarmFuture) -> None:
        with self.lock:
            self.futures.add(future)

    def snapshot(self) -> list[FarmFuture]:
        with self.lock:
            return list(self.futures)

    def __call__(self, future: FarmFuture) -> None:
        with self.lock:
            self.futures.discard(future)

    def forget(self, futures: list[FarmFuture]) -> None:
        with self.lock:
            self.futures.difference_update(futures)


#: an outcome on its way to its future: (future, value, None) or (future, None, error)
Outcome = tuple[concurrent.futures.Future[Any], Any, BaseException | None]


def start_unwatched(futures: list[FarmFuture]) -> None:
    """Move to RUNNING, under one hold of `_make_lock`, each of ``futures``
    still PENDING that no thread has locked or waited on (no condition yet):
    `FarmFuture._start` for a whole bundle, which took the lock once per call.
    The others stay as they are, for `_start` to move or to find cancelled."""
    with _make_lock:
        for future in futures:
            if future._cond is None and future._state == _PENDING:
                future._state = _RUNNING


def succeed_unwatched(outcomes: list[Outcome]) -> tuple[list[FarmFuture], list[Outcome]]:
    """Resolve, under one hold of `_make_lock`, each success in ``outcomes``
    whose FarmFuture no thread has locked or waited on: there is nobody to
    notify, and `FarmFuture._succeed` took the lock once per future.

    Returns the futures resolved here, whose done-callbacks are still to run
    (`call_back_all`), and the other outcomes in their order (failures, and
    futures a thread waits on), which go the usual way.  A future has one
    outcome at most, so resolving these first changes no result, only the
    order in which the round's futures resolve."""
    resolved: list[FarmFuture] = []
    rest: list[Outcome] = []
    with _make_lock:
        for outcome in outcomes:
            future, value, error = outcome
            if error is None and type(future) is FarmFuture and future._cond is None:
                if future._state not in _RESOLVED:
                    future._result = value
                    future._state = _FINISHED
                    resolved.append(future)
            else:
                rest.append(outcome)
    return resolved, rest


def call_back_all(futures: list[FarmFuture]) -> None:
    """The done-callbacks of ``futures``, just resolved: an executor's
    `PendingSet` forgets its futures together; a future with callbacks of
    its own has them all run as `FarmFuture._invoke_callbacks` does."""
    sink: PendingSet | None = None
    batch: list[FarmFuture] = []
    for future in futures:
        on_done = future._on_done
        if future._done_callbacks or type(on_done) is not PendingSet:
            future._invoke_callbacks()
            continue
        if on_done is not sink:
            if sink is not None:
                sink.forget(batch)
                batch = []
            sink = on_done
        batch.append(future)
    if sink is not None:
        sink.forget(batch)
