"""What rank 0 does with a task's outcome once it is decided: the journal's
record, the listeners' event, and the future, resolved only at the next
commit, after the journal has made that round's outcomes durable.

Which task an outcome belongs to, and what it means (accept, retry, fail,
quarantine), is decided by `taskfarm._master` and `taskfarm._scheduler`; this
module only records and resolves.  It runs on the service thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from typing import Any

from . import _serialization as ser
from ._errors import BrokenFarmError, RemoteTraceback, SerializationError
from ._future import _CANCELLED, _PENDING, _RESOLVED, FarmFuture, Outcome, _Encoded, call_back_all, succeed_unwatched
from ._journal_writer import JournalWriter
from ._protocol import PartResult, ResultItem

#: a listener gets (event, fields); events: worker_joined, submitted, dispatched,
#: succeeded, failed, retried, cancelled, rank_lost, drained (see docs/events.md)
Listener = Callable[[str, dict[str, Any]], None]

#: a task's or a bundled call's outcome as a worker sent it
Result = ResultItem | PartResult


class Outcomes:
    """The round's outcomes on their way to the journal, the listeners and the futures.

    ``listeners`` is the farm's own list (an event is built only while it is
    not empty); ``emit`` sends one event to them.
    """

    def __init__(self, journal: JournalWriter | None, listeners: list[Listener], emit: Callable[..., None]) -> None:
        self.journal = journal
        self._listeners = listeners
        self._emit = emit
        #: futures to resolve at the next commit: (future, value, None) or
        #: (future, None, error); tuples, not closures (fewer objects per task)
        self._pending: list[Outcome] = []

    def succeeded(self, future: FarmFuture, key: str | None, peer: int, attempt: int, result: Result) -> None:
        """A task's (or a bundled call's) success: journal first, its future at the commit."""
        frame = (result.payload, result.buffers)
        if self.journal is not None and key is not None:
            self.journal.succeeded(
                key, rank=peer, attempt=attempt, t_start=result.t_start, t_end=result.t_end, result=frame
            )
        self._pending.append((future, _Encoded(frame), None))
        if self._listeners:
            self._event("succeeded", result.task_id, result.t_start, result.t_end, peer, key, future.label, attempt)

    def recorded(self, key: str, peer: int, attempt: int, frame: ser.Frame, t_start: float, t_end: float) -> None:
        """A success journaled with no future to resolve (a call a drain cut
        off, whose result came anyway: `_intake.ResultIntake._on_late`); `sync` makes
        it durable."""
        if self.journal is not None:
            self.journal.succeeded(key, rank=peer, attempt=attempt, t_start=t_start, t_end=t_end, result=frame)

    def sync(self) -> None:
        """Make the journal's records so far durable."""
        if self.journal is not None:
            self.journal.sync()

    def succeeded_with(
        self, future: FarmFuture, key: str | None, peer: int, attempt: int, value: Any, t_start: float, t_end: float
    ) -> None:
        """`succeeded`, for a bundled call whose value came as it is (a plain
        type: `taskfarm._protocol.PartValues`); pickled here only for the journal."""
        if self.journal is not None and key is not None:
            frame = ser.dumps(value, "result")
            self.journal.succeeded(key, rank=peer, attempt=attempt, t_start=t_start, t_end=t_end, result=frame)
        self._pending.append((future, value, None))
        if self._listeners:
            self._event("succeeded", future.task_id, t_start, t_end, peer, key, future.label, attempt)

    def attempt_failed(
        self,
        event: str,
        label: str,
        key: str | None,
        peer: int,
        attempt: int,
        result: Result,
        error: BaseException | None,
        *,
        final: bool,
        counts: bool,
    ) -> None:
        """A failed attempt as the worker sent it (its exception, pickled): the
        ``event`` ("failed" or "retried") and the journal's record.  Whether and
        how its future fails is the caller's (`fail`)."""
        if self._listeners:
            crashed = getattr(result, "crashed", False)
            self._event(event, result.task_id, result.t_start, result.t_end, peer, key, label, attempt, error, crashed)
        if self.journal is not None and key is not None:
            self.journal.failed(
                key,
                rank=peer,
                attempt=attempt,
                t=result.t_end,
                error=(result.payload, result.buffers),
                error_text=result.traceback or repr(error),
                final=final,
                counts_as_attempt=counts,
            )

    def failed_here(self, future: FarmFuture, key: str | None, error: BaseException) -> None:
        """The event and the journal's record of a failure decided on rank 0, not
        by a worker's attempt (a failed input, a lost bundle, a broken farm).
        Whether and how its future fails is the caller's (`fail`)."""
        text = f"{type(error).__name__}: {error}"
        if self._listeners:
            self._emit("failed", task=future.task_id, key=key, label=future.label, rank=None, error=text, crashed=False)
        if self.journal is not None and key is not None:
            self.journal.failed(key, rank=-1, attempt=0, t=time.time(), error=None, error_text=text, final=True)

    def cancelled(self, future: FarmFuture, key: str | None) -> None:
        """A cancelled task's journal record and event; wait() and as_completed()
        count a cancelled future only once it is marked notified."""
        if self.journal is not None and key is not None:
            self.journal.cancelled(key, t=time.time())
        if self._listeners:
            self._emit("cancelled", task=future.task_id, key=key, label=future.label)
        if future._state == _CANCELLED:
            future.set_running_or_notify_cancel()

    def fail(self, future: FarmFuture, error: BaseException) -> None:
        """``future`` fails with ``error`` at the next commit."""
        self._pending.append((future, None, error))

    def commit(self) -> bool:
        """Make this round's outcomes durable (one journal sync), then resolve
        their futures; True if a thread was waiting on one of them."""
        if not self._pending:
            return False
        if self.journal is not None:
            self.journal.sync()  # group commit: one fsync for this round's outcomes
        pending, self._pending = self._pending, []
        # most are successes of futures no thread waits on: resolved together
        # (a lone outcome, as an idle farm's round trip brings, goes as it is)
        resolved, rest = succeed_unwatched(pending) if len(pending) > 1 else ([], pending)
        awaited = False
        for future, value, error in rest:
            # a FarmFuture makes its condition when a thread first waits on it
            awaited = awaited or type(future) is not FarmFuture or future._cond is not None
            if error is None:
                succeed(future, value)
            else:
                fail_future(future, error)
        call_back_all(resolved)
        return awaited

    def _event(
        self,
        event: str,
        task_id: int,
        t_start: float,
        t_end: float,
        peer: int,
        key: str | None,
        label: str,
        attempt: int,
        error: BaseException | None = None,
        crashed: bool = False,
    ) -> None:
        fields: dict[str, Any] = {
            "task": task_id,
            "key": key,
            "label": label,
            "rank": peer,
            "attempt": attempt,
            "start": t_start,
            "end": t_end,
        }
        if error is not None:
            fields.update(error=f"{type(error).__name__}: {error}", crashed=crashed)
        self._emit(event, **fields)


def decode_error(result: Result, peer: int) -> BaseException:
    """The exception a worker sent for a failed task, with its remote traceback
    as the cause; a stand-in when it cannot be loaded here."""
    try:
        error = ser.loads(result.payload, result.buffers)
    except Exception as exc:  # noqa: BLE001 - an exception the master cannot load
        error = SerializationError(
            f"the exception of task {result.task_id} could not be loaded on the master: {exc!r}",
            where="exception",
        )
    if not isinstance(error, BaseException):
        error = BrokenFarmError(f"rank {peer} sent a non-exception as an error: {error!r}")
    if result.traceback:
        error.__cause__ = RemoteTraceback(result.traceback)
    return error  # type: ignore[no-any-return]


def succeed(future: concurrent.futures.Future[Any], value: Any) -> None:
    """Resolve ``future`` with ``value`` unless it already is (or was cancelled).

    The state is read without the future's lock first: a resolved future
    stays resolved, and ``set_result`` checks again under the lock.
    """
    if future._state in _RESOLVED:  # type: ignore[attr-defined]
        return
    if type(future) is FarmFuture:
        future._succeed(value)
        return
    # a user thread may cancel a pending future between the check and the set
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(value)


def fail_future(future: concurrent.futures.Future[Any], error: BaseException) -> None:
    """Fail ``future`` with ``error`` unless it is resolved or cancelled."""
    if future.done():
        return
    # a user thread may cancel a pending future between these steps (seen in a
    # drain: the service thread died on InvalidStateError and the job hung)
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if future._state == _PENDING and not future.set_running_or_notify_cancel():  # type: ignore[attr-defined]
            return
        future.set_exception(error)
