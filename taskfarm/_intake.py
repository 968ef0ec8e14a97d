"""Step 1 of the farm's round: what the workers send, taken in.

Results (a task's, a bundle's, or calls of a bundle still running), tasks
given back after a steal, Hellos, logs and Byes.  A result is handed to the
scheduler, which decides (accept, retry, discard a late copy); the outcome
goes to `taskfarm._outcomes`, which journals it before its future resolves.
Results that come after a drain cut their calls off are journaled once, so a
resumed run does not redo them (`ResultIntake._on_late`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from . import _serialization as ser
from ._dispatch import Dispatching
from ._errors import MaxRetriesExceededError, TimeLimitExceeded, WorkerLostError
from ._outcomes import decode_error
from ._protocol import Kind, PartResult, ResultBatch, ResultItem
from ._scheduler import Decision, Scheduler
from ._task import TaskState

log = logging.getLogger("taskfarm.master")


class ResultIntake(Dispatching):
    """Step 1 (see the module docstring), over the dispatching layer."""

    # step 1
    def _receive(self) -> bool:
        got = False
        # rings of the messages this probe takes: consumed now, they do not wake
        # the next wait (a wait a ring has just ended took them already)
        if self._rings_taken:
            self._rings_taken = False
        else:
            self._rung = self.transport.take_rings() or self._rung
        while (message := self.transport.poll()) is not None:
            got = True
            peer, kind, record = message
            now = time.monotonic()
            self.scheduler.heard_from(peer, now)
            if self._cut and (kind is Kind.RESULTS or kind is Kind.PARTS):
                self._on_late(peer, record)  # journaled; the handler below finds no task, and only counts it
            if kind is Kind.RESULTS:
                self._on_results(peer, record, now)
            elif kind is Kind.PARTS:
                self._on_parts(peer, record)
            elif kind is Kind.RELEASED:
                self._on_released(peer, record.task_ids, now)
            elif kind is Kind.HEARTBEAT:
                pass
            elif kind is Kind.HELLO:
                self._on_hello(peer, record, now)
            elif kind is Kind.LOG:
                _relay_logs(peer, record.records)
            elif kind is Kind.BYE:
                self._byes[peer] = record
                if not self._stop_sent:
                    # a rank leaves unasked only when the farm's own code or one
                    # of its MPI calls failed there (a slot's, `Worker._serve_slot_or_leave`,
                    # or the comm thread's): what it held is resubmitted now,
                    # not after a heartbeat timeout
                    self._lose(peer, now, "it left the farm after an error of its own (see its log)")
            else:
                log.warning("unexpected %s from rank %d", kind.name, peer)
        return got

    def _on_results(self, peer: int, batch: ResultBatch, now: float) -> None:
        self._last_result = now
        if self._timed_trip is not None:
            self._time_trip(batch, now)
        for item in batch.items:
            if item.parts or item.values is not None or item.task_id in self._bundler.bundles:
                self._on_bundle(peer, item, now)
                continue
            task = self._tasks.get(item.task_id)
            if task is not None:
                self._bundler.observe(task.fn[0], item.t_end - item.t_start)
            retryable = False
            error: BaseException | None = None
            if not item.ok and task is not None:
                error = decode_error(item, peer)
                always = (TimeLimitExceeded, WorkerLostError)  # the farm's own, always retryable
                retryable = isinstance(error, (*always, *task.policy.retry_on))
            decision = self._finished(peer, item, now, (item,), retryable=retryable, crashed=item.crashed)
            if task is None or decision is Decision.DISCARD:
                continue
            future = task.future
            if decision is Decision.ACCEPT:
                self._tasks.pop(item.task_id, None)
                self._outcomes.succeeded(future, task.key, peer, item.attempt, item)
                continue
            retry = decision is Decision.RETRY
            self._outcomes.attempt_failed(
                "retried" if retry else "failed",
                future.label,
                task.key,
                peer,
                item.attempt,
                item,
                error,
                final=not retry,
                counts=not item.crashed,
            )
            if retry:
                future._task_state = TaskState.RETRY
            else:
                assert error is not None
                if decision is Decision.EXHAUSTED:
                    outer: BaseException = MaxRetriesExceededError(
                        f"task {item.task_id} failed {task.policy.max_retries + 1} times "
                        f"(max_retries={task.policy.max_retries}); last error: {error!r}"
                    )
                    outer.__cause__ = error
                    error = outer
                elif decision is Decision.QUARANTINE:
                    outer = WorkerLostError(
                        f"task {item.task_id} was quarantined: it killed {task.policy.max_crashes} worker processes"
                    )
                    outer.__cause__ = error
                    error = outer
                self._fail(item.task_id, error)
        if self.scheduler.revoking:  # a speculative task won: its other copy is cut off
            self._send_revokes()

    def _time_trip(self, batch: ResultBatch, now: float) -> None:
        """The trial's round trip is back: its time, less the task's own, is
        a timing of the way it took (see `_ring_ahead`)."""
        assert self._timed_trip is not None
        task_id, started, early = self._timed_trip
        for item in batch.items:
            if item.task_id == task_id:
                self._timed_trip = None
                self._ring_trial.record(early, now - started - (item.t_end - item.t_start))
                return

    def _on_bundle(self, peer: int, item: ResultItem, now: float) -> None:
        """A bundle's outcome: each part resolves its own call (`taskfarm._dispatch`, "Bundles")."""
        failed = sum(1 for part in item.parts if not part.ok) if item.ok else 0
        decision = self._finished(peer, item, now, item.parts, failed_parts=failed)
        subs = self._bundler.bundles.get(item.task_id)
        if subs is None or decision is Decision.DISCARD or decision is Decision.RETRY:
            return  # a late copy; or put back in the queue, whole
        del self._bundler.bundles[item.task_id]
        if decision is not Decision.ACCEPT:  # the bundle itself failed (a worker fault)
            error = decode_error(item, peer)
            for sub in subs:
                self._fail(sub.future.task_id, error, journaled=False)
            return
        # all its calls: some may have come before it ended (`_on_parts`)
        self._bundler.observe(subs[0].fn[0], (item.t_end - item.t_start) / len(subs))
        self._resolve_parts(peer, item)

    def _finished(
        self,
        peer: int,
        item: ResultItem,
        now: float,
        results: Iterable[ResultItem | PartResult],
        *,
        retryable: bool = False,
        crashed: bool = False,
        failed_parts: int = 0,
    ) -> Decision:
        """The scheduler's decision on ``item`` (a task's or a whole bundle's)
        from ``peer``: its time on the rank, and the bytes of ``results``
        when tasks wait to take them as inputs."""
        return self.scheduler.finished(
            item.task_id,
            peer,
            now,
            ok=item.ok,
            duration=item.t_end - item.t_start,
            retryable=retryable,
            crashed=crashed,
            failed_parts=failed_parts,
            nbytes=_result_nbytes(self.scheduler, item, results),
        )

    def _on_parts(self, peer: int, batch: ResultBatch) -> None:
        """Calls of bundles still running on ``peer`` that ended a while ago
        (`taskfarm._pools.BundleProgress`): resolved now, not when their
        bundle ends.  A call no longer of that bundle (dissolved, its rank
        lost) or resolved already is left alone: counted once."""
        tasks = self._tasks
        for item in batch.items:
            ids = [part.task_id for part in item.parts]
            if item.values is not None:
                ids += item.values.task_ids
            if all((task := tasks.get(task_id)) is not None and task.future._bundle == item.task_id for task_id in ids):
                failed = sum(1 for part in item.parts if not part.ok)
                if failed:  # the statistics count them when the bundle ends
                    self.scheduler.parts_failed(item.task_id, failed)
                self._resolve_parts(peer, item)

    def _resolve_parts(self, peer: int, item: ResultItem) -> None:
        """Each call in ``item`` (a bundle's, whole or in part) resolves its own future."""
        values = item.values
        outcomes = self._outcomes
        tasks = self._tasks
        if values is not None:
            for task_id, value, t_start, t_end in zip(*values):
                task = tasks.pop(task_id, None)
                if task is not None:  # else failed meanwhile, as below
                    outcomes.succeeded_with(task.future, task.key, peer, item.attempt, value, t_start, t_end)
        for part in item.parts:
            task = tasks.pop(part.task_id, None)
            if task is None:
                continue  # failed meanwhile (the farm broke), or came before (`_on_parts`)
            future = task.future
            if part.ok:
                outcomes.succeeded(future, task.key, peer, item.attempt, part)
                continue
            error = decode_error(part, peer)
            outcomes.attempt_failed(
                "failed", future.label, task.key, peer, item.attempt, part, error, final=True, counts=True
            )
            outcomes.fail(future, error)

    def _on_late(self, peer: int, batch: ResultBatch) -> None:
        """Results that came after a drain's grace ran out (`_end_drain`):
        the successes of calls it cut off are journaled, once each, so that
        a resumed run does not do them again; their futures failed already,
        and a failure is not counted, as the cut itself is not.  A worker
        sends what it has done as soon as Stop comes
        (`_worker.Worker._send_done`)."""
        recorded = False
        for item in batch.items:
            if item.values is not None:
                for task_id, value, t_start, t_end in zip(*item.values):
                    key = self._cut.pop(task_id, None)
                    if key is not None:
                        frame = ser.dumps(value, "result")
                        self._outcomes.recorded(key, peer, item.attempt, frame, t_start, t_end)
                        recorded = True
            results = item.parts if item.parts or item.values is not None else (item,)
            for result in results:
                key = self._cut.pop(result.task_id, None) if result.ok else None
                if key is not None:
                    frame = (result.payload, result.buffers)
                    self._outcomes.recorded(key, peer, item.attempt, frame, result.t_start, result.t_end)
                    recorded = True
        if recorded:
            self._outcomes.sync()

    def _on_released(self, peer: int, task_ids: Iterable[int], now: float) -> None:
        """Queued tasks ``peer`` gave back after a steal: ready again, and a
        bundle among them held again, to be bundled anew (`Bundler.unbundle`)."""
        task_ids = tuple(task_ids)
        self.scheduler.released(peer, task_ids, now)
        for task_id in task_ids:
            # not a bundle another task waits for, nor one still held elsewhere (a copy)
            if task_id in self._bundler.bundles and self.scheduler.dissolve(task_id):
                self._bundler.unbundle(task_id)


def _relay_logs(peer: int, records: Any) -> None:
    """Hand a worker's log records to rank 0's loggers, the rank in front of the message."""
    for name, level, message, created in records:
        logger = logging.getLogger(name)
        if logger.isEnabledFor(level):
            record = logging.makeLogRecord(
                {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "rank": peer}
            )
            record.msg = f"[rank {peer}] {message}"
            record.created, record.msecs = created, (created % 1) * 1000
            logger.handle(record)


def _result_nbytes(scheduler: Scheduler, item: ResultItem, results: Iterable[ResultItem | PartResult]) -> int:
    """Bytes of ``item``'s result(s) (a bundle: all its calls') when tasks
    wait to take them as inputs (they count against `PREFETCH_BYTES` where
    those go); else 0, without looking at them."""
    if not item.ok or not scheduler.awaited(item.task_id):
        return 0
    nbytes = sum(ser.frame_nbytes((result.payload, result.buffers)) for result in results)
    if item.values is not None:  # plain values: only a string's size is worth counting
        nbytes += sum(len(value) for value in item.values.values if type(value) in (str, bytes))
    return nbytes
