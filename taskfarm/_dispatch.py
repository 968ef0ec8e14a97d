"""Steps 3 to 5 of the farm's round: submissions in, tasks out.

Step 3 takes the user threads' submissions and cancellations in; step 4
notices ranks ULFM says are gone; step 5 asks the scheduler what to send
where, and sends it.  Workers' Hellos are answered here too: a rank's
first word back is its Config.

Bundles.  Plain calls submitted faster than they run ride together (why,
and the size rule: `taskfarm._bundles`): a submission with nothing special
about it (no inputs, schedule, priority, time limit, retries, isolation,
speculation or out-of-band arguments) is held, unless nothing else submitted
is unfinished (a call alone has no company to wait for), and step 5 takes
from the held calls only what the ranks have room for, each rank's share a
bundle.  To the scheduler and the wire a bundle is one task (its entry's
weight counts its calls); the worker runs its parts one after another and
sends one outcome per part; each call keeps its own future, journal record,
events and traceback.
A bundle put back after its rank was lost goes out again one call per task,
so a call that kills workers is quarantined alone; one stolen back from a
busy rank is held again and bundled anew, in the smaller bundles the tail
calls for.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import _serialization as ser
from ._bundles import BUNDLE_CALL_BYTES, HELD, UNTIMED_DEPTH
from ._errors import BrokenFarmError, DependencyFailed, TaskExpired, WorkerLostError
from ._farm_state import FarmState, Submission, _new_part
from ._future import _CANCELLED, _PENDING, _RUNNING, FarmFuture, start_unwatched
from ._loopback import Loopback
from ._outcomes import fail_future
from ._protocol import PROTOCOL_VERSION, FnRef, Hello, Kind, Part, Revoke, Steal, Stop, TaskBatch, TaskItem
from ._task import TaskPolicy, TaskState
from ._worker import serve_in_thread

log = logging.getLogger("taskfarm.master")

#: with nothing happening, the scheduler is still consulted this often (seconds):
#: ready tasks expire while every rank is full
DISPATCH_PERIOD = 0.05
#: workers send heartbeats this many times per heartbeat timeout
HEARTBEATS_PER_TIMEOUT = 4
#: a bundle's policy to the scheduler: its calls have the default one (no retries)
_BUNDLE_POLICY = TaskPolicy()


class Dispatching(FarmState):
    """Steps 3-5 (see the module docstring), over the farm's record."""

    def _apply_configuration(self) -> None:
        """Start rank 0's own worker if wanted; answer the Hellos that waited."""
        if self.master_works and not isinstance(self.transport, Loopback):
            # rank 0 runs tasks too: peer 0, a worker thread in this process (_loopback)
            loopback = Loopback(self.transport, self._wake)
            self.transport = loopback
            self._peers = loopback.peers()
            serve_in_thread(loopback.local)
        self._ready = True
        parked, self._parked = self._parked, []
        now = time.monotonic()
        for peer, hello in parked:
            self._on_hello(peer, hello, now)

    def _on_hello(self, peer: int, hello: Hello, now: float) -> None:
        self._hosts[peer] = hello.host
        if hello.version != PROTOCOL_VERSION:
            log.error(
                "rank %d speaks protocol %d, this master %d: mixed taskfarm versions; rank not used",
                peer,
                hello.version,
                PROTOCOL_VERSION,
            )
            self.transport.send(peer, Kind.STOP, Stop("protocol version mismatch"))
            return
        if self._closing and not self._submissions and not self._has_work():
            return  # Stop follows (a submission not yet taken in is work to come)
        if not self._ready:
            self._parked.append((peer, hello))  # answered once the pool is known
            return
        slots = hello.slots or self.pool.concurrency
        if self.scheduler.add_worker(peer, slots, now):
            if self._listeners:
                self._emit("worker_joined", rank=peer, host=hello.host, pid=hello.pid, slots=slots)
            interval = self.heartbeat_timeout / HEARTBEATS_PER_TIMEOUT if self.heartbeat_timeout else 60.0
            self.transport.connect_doorbell(peer, hello.doorbell)  # so Config rings it already
            config = self.pool.config(interval)._replace(doorbell=self.transport.doorbell())
            self.transport.send(peer, Kind.CONFIG, config)

    # step 3
    def _take_submissions(self) -> bool:
        if not self._submissions:
            return False
        now = time.monotonic()
        while self._submissions:
            sub = self._submissions.popleft()
            if type(sub) is tuple:
                what, arg = sub
                if what == "cancel" and self.scheduler.cancel(arg):
                    task = self._tasks.pop(arg, None)
                    if task is not None:
                        self._outcomes.cancelled(task.future, task.key)
                    self._fail_dependents_of_cancelled(arg)
                    # resolve those failures now: a later submission in this batch may
                    # name one of them as its input and must see it done
                    self._commit()
                elif what == "cancel":
                    held = self._tasks.get(arg)  # a held call, or one in a bundle not sent yet
                    if held is not None and held.future._bundle and held.future._state == _CANCELLED:
                        self._cancelled_outside(held)
                elif what == "executor":
                    self._executors[arg.executor_id] = arg
                elif what == "configure":
                    self._apply_configuration()
                continue
            self._admit(sub, now)
        return True

    def _fail_dependents_of_cancelled(self, task_id: int) -> None:
        for dependent, failed in self.scheduler.fail_dependents(task_id):
            self._fail(
                dependent,
                DependencyFailed(f"input task {failed} of task {dependent} failed or was cancelled"),
            )

    def _admit(self, sub: Submission, now: float) -> None:
        future = sub.future
        if future._state == _CANCELLED:  # without its lock: a later cancel is caught at dispatch
            # cancelled before the service thread saw it: wait() and as_completed()
            # count a cancelled future only once it is marked notified
            future.set_running_or_notify_cancel()
            self.scheduler.cancelled_outside()  # submitted and cancelled, in the counts too
            return
        # failures decided here resolve at once, not at the next commit: a later
        # submission in this same batch may name this future as its input, and
        # must see it done (nothing here needs the journal's group commit)
        if self._broken is not None:
            fail_future(future, BrokenFarmError(str(self._broken)))
            return
        waiting = []
        nbytes = 0  # of its inputs that are done: they travel with it (see PREFETCH_BYTES)
        for dep in sub.inputs:  # usually none
            if not dep.done():
                waiting.append(self._scheduled_as(dep))
            elif dep.cancelled() or dep.exception(0) is not None:
                error = DependencyFailed(f"input task {dep.task_id} of task {future.task_id} failed or was cancelled")
                fail_future(future, error)
                return
            elif (frame := dep.encoded_result()) is not None:
                nbytes += ser.frame_nbytes(frame)
        task_id = future.task_id
        self._tasks[task_id] = sub
        if self.journal is not None and sub.key is not None:
            self.journal.submitted(sub.key, label=future.label, t=time.time())
        if self._listeners:
            self._emit("submitted", task=task_id, key=sub.key, label=future.label)
        # a call alone on the farm (nothing else submitted and unfinished) goes
        # as a task of its own: with no company to wait for, holding it only
        # cost the bundler's pass (~40 us of an idle farm's round trip, cold)
        if not waiting and len(self._tasks) > 1 and self._bundleable(sub):
            self._bundler.hold(sub)
            return
        ready = self.scheduler.submit(
            task_id,
            now,
            policy=sub.policy,
            priority=sub.priority,
            not_before=sub.not_before,
            expires=None if sub.expires is None else now + (sub.expires - time.time()),
            inputs=waiting,
            nbytes=nbytes + ser.frame_nbytes(sub.call),
        )
        if not ready:
            future._task_state = TaskState.SCHEDULED

    def _bundleable(self, sub: Submission) -> bool:
        """True for a call with nothing that needs a task of its own (see "Bundles" above)."""
        policy = sub.policy
        return (
            sub.bundle
            and not sub.inputs
            and sub.not_before is None
            and sub.expires is None
            and sub.time_limit is None
            and sub.priority == 0
            and not sub.call[1]
            and len(sub.call[0]) <= BUNDLE_CALL_BYTES
            and policy.max_retries == 0
            and not policy.speculative
            and policy.isolation != "process"
            and self.pool.kind != "processes"
        )

    def _scheduled_as(self, dep: FarmFuture) -> int:
        """The scheduler task that runs ``dep``'s call: its own, or its bundle's."""
        if dep._bundle == HELD:
            self._feed(time.monotonic(), flush=True)  # a task waits for it: it needs a task id now
        return dep._bundle or dep.task_id

    def _backlog(self) -> bool:
        """True while tasks wait for room on the ranks (held calls included)."""
        return self._bundler.live > 0 or self.scheduler.has_ready()

    def _feed(self, now: float, *, flush: bool = False) -> None:
        """Hand held calls to the scheduler, as many as the ranks have room for
        (all of them with ``flush``), in bundles sized from the calls' measured
        time (`Bundler.size`); no bundle larger than the room of the rank it
        will go to.  Calls of a function not yet timed go one by one, and no
        slot holds more than `UNTIMED_DEPTH` tasks meanwhile: the first result
        times the function, and until then no rank queues hundreds of calls
        of unknown length (the other functions' mean may have made its
        pipeline deep)."""
        bundler = self._bundler
        scheduler = self.scheduler
        probes: int | None = None  # untimed calls that may still go: computed when first needed
        waiting = 0
        if flush:
            rooms = [len(bundler.held)]
        else:
            rooms = scheduler.rooms()
            # tasks already waiting take the freest ranks first
            ready = waiting = scheduler.ready_weight(limit=sum(rooms))
            for i, room in enumerate(rooms):
                taken = min(room, ready)
                rooms[i] -= taken
                ready -= taken
        slots = scheduler.live_slots()
        tasks = self._tasks

        def alive(sub: Submission) -> bool:
            return tasks.get(sub.future.task_id) is sub  # else cancelled while held (counted then)

        for room in rooms:
            while bundler.held and room > 0:
                head = bundler.first(alive)
                if head is None:
                    return
                if not flush and not bundler.timed(head.fn[0]):  # a flush needs every task id now
                    if probes is None:
                        probes = scheduler.shallow_rooms(UNTIMED_DEPTH) - waiting
                    if probes <= 0:
                        return  # held in order: what follows waits for the first result too
                    probes -= 1
                parts = bundler.take(room, slots, alive)
                if not parts:
                    return
                room -= len(parts)
                if len(parts) == 1:  # a task of its own
                    sub = parts[0]
                    sub.future._bundle = 0
                    scheduler.submit(sub.future.task_id, now, policy=sub.policy, nbytes=len(sub.call[0]))
                    continue
                bundle_id = self.new_task_id()
                bundler.made(bundle_id, parts)
                nbytes = sum(len(sub.call[0]) for sub in parts)  # in-band only: see _bundleable
                scheduler.submit(bundle_id, now, policy=_BUNDLE_POLICY, weight=len(parts), nbytes=nbytes)

    def _cancelled_outside(self, sub: Submission) -> None:
        """A held call, or one in a bundle not yet sent, was cancelled: the
        scheduler does not know it by itself."""
        future = sub.future
        task_id = future.task_id
        self._tasks.pop(task_id, None)
        bundle = future._bundle
        if bundle == HELD:
            self._bundler.live -= 1
            self.scheduler.cancelled_outside()
        elif bundle:
            self.scheduler.drop_parts(bundle, 1)
        self._outcomes.cancelled(future, sub.key)

    def _dissolve(self, requeued: list[int], now: float) -> list[int]:
        """Bundles among ``requeued`` (their rank was lost) go out again one call
        per task, so that a call that kills workers is quarantined alone.
        Returns ``requeued`` with each bundle replaced by its calls' ids."""
        out = []
        for task_id in requeued:
            subs = self._bundler.bundles.get(task_id)
            if subs is None or not self.scheduler.dissolve(task_id):
                out.append(task_id)  # a task, or a bundle others wait for: it stays whole
                continue
            del self._bundler.bundles[task_id]
            for sub in subs:
                future = sub.future
                if self._tasks.get(future.task_id) is sub:
                    future._bundle = 0
                    self.scheduler.submit(future.task_id, now, policy=sub.policy, nbytes=len(sub.call[0]))
                    out.append(future.task_id)
        return out

    # step 4
    def _notice_lost(self) -> bool:
        lost = self.transport.take_lost()
        now = time.monotonic()
        for rank in lost:
            self._lose(rank, now, "its process failed (ULFM)")
        return bool(lost)

    def _lose(self, rank: int, now: float, why: str) -> None:
        requeued = self._dissolve(self.scheduler.rank_lost(rank, now), now)
        if self._listeners:
            self._emit("rank_lost", rank=rank, reason=why, resubmitted=list(requeued))
        log.warning("rank %d lost: %s; %d task(s) resubmitted", rank, why, len(requeued))
        self.transport.forget(rank)
        for task_id in self.scheduler.quarantined(requeued):
            self._fail(task_id, WorkerLostError(f"task {task_id} was quarantined after killing workers"))
        for task_id in requeued:
            task = self._tasks.get(task_id)
            if task is not None:
                task.future._task_state = TaskState.RETRY

    def _send_revokes(self) -> None:
        """Tell the ranks running the losing copies of speculative tasks to
        drop or cut them off (`taskfarm._worker`); their answers are dropped.
        Sent at once, not at the next dispatch: the winner may be the farm's
        last result, after which no dispatch runs."""
        for rank, task_ids in self.scheduler.take_revokes().items():
            self.transport.send(rank, Kind.REVOKE, Revoke(tuple(task_ids)))

    # step 5
    def _dispatch_if_due(self, progressed: bool) -> bool:
        """Step 5 if something changed (``progressed``) or a timer is due, and
        only while the farm has work: the round that takes an idle farm's
        last result skips the scheduler's poll, which finds nothing to send,
        steal or copy then (~40 us run cold, on the round trip's critical
        path).  True if the dispatch did anything."""
        if not progressed and time.monotonic() < self._next_dispatch:
            return False  # nothing changed since the last one
        if not self._has_work():
            self._next_dispatch = float("inf")  # nothing timed without tasks; a submission polls again
            return False
        return self._dispatch()

    def _dispatch(self) -> bool:
        now = time.monotonic()
        if self._bundler.held:
            self._feed(now)
        actions = self.scheduler.poll(now)
        wakeup = self.scheduler.next_wakeup()
        # only ready tasks need a periodic look (they may expire while every rank is full)
        period = now + DISPATCH_PERIOD if self.scheduler.has_ready() else float("inf")
        self._next_dispatch = period if wakeup is None else min(wakeup, period)
        if not actions:
            return False
        for rank in actions.lost_ranks:
            self._lose(rank, now, f"silent for more than {self.heartbeat_timeout:g} s")
        for task_id in actions.expired:
            self._fail(task_id, TaskExpired(f"task {task_id} expired before it could start"), journaled=False)
        for rank, task_ids in actions.steal.items():
            self.transport.send(rank, Kind.STEAL, Steal(tuple(task_ids)))
        dispatch = actions.dispatch
        for rank in actions.starting:
            # a burst's start: every idle rank gets one task (a bundle) of its own
            # before any gets the rest of its pipeline, a message of hundreds of
            # calls that takes milliseconds to build while the next rank waited
            task_ids = dispatch[rank]
            if len(task_ids) > 1 and len(dispatch) > 1:
                self._send_tasks(rank, task_ids[:1])
                dispatch[rank] = task_ids[1:]
        for rank, task_ids in dispatch.items():
            self._send_tasks(rank, task_ids)
        if actions.lost_ranks:
            return self._dispatch() or True
        return True

    def _send_tasks(self, rank: int, task_ids: list[int]) -> None:
        by_executor: dict[int, list[TaskItem]] = {}
        sent_fns = self._fn_sent[rank]
        attempt_of = self.scheduler.attempt
        awaited = self.scheduler.awaited
        for task_id in task_ids:
            bundle = self._bundler.bundles.get(task_id)
            if bundle is not None:
                item = self._bundle_item(rank, task_id, bundle, sent_fns)
                if item is not None:
                    by_executor.setdefault(bundle[0].executor_id, []).append(item)
                continue
            sub = self._tasks[task_id]
            future = sub.future
            try:
                deps = tuple(self._dep_value(dep) for dep in sub.inputs) if sub.inputs else ()
            except Exception as exc:
                log.exception("task %d: cannot prepare its inputs", task_id)
                self.scheduler.withdraw(task_id, rank)
                self._tasks.pop(task_id, None)
                fail_future(future, DependencyFailed(f"task {task_id}: an input could not be passed on: {exc!r}"))
                self._fail_dependents_of_cancelled(task_id)
                continue
            if not _mark_running(future):
                # cancelled just now: its "cancel" note, still queued, will find nothing
                self.scheduler.withdraw(task_id, rank)
                self._tasks.pop(task_id, None)
                self._outcomes.cancelled(future, sub.key)
                self._fail_dependents_of_cancelled(task_id)
                continue
            attempt = attempt_of(task_id)
            self._mark_dispatched(sub, rank, attempt)
            call, buffers = sub.wire_call()
            by_executor.setdefault(sub.executor_id, []).append(
                TaskItem(
                    task_id,
                    attempt,
                    _fn_ref(sub.fn, sent_fns),
                    call,
                    buffers,
                    deps,
                    sub.time_limit,
                    sub.policy.isolation,
                    awaited(task_id),
                )
            )
        for executor_id, items in by_executor.items():
            init = None
            info = self._executors.get(executor_id)
            if info is not None and info.initializer is not None and executor_id not in self._init_sent[rank]:
                init = info.initializer
                self._init_sent[rank].add(executor_id)
            self.transport.send(rank, Kind.TASKS, TaskBatch(init, tuple(items), executor_id))

    def _bundle_item(
        self, rank: int, bundle_id: int, subs: list[Submission], sent_fns: set[bytes]
    ) -> TaskItem | None:
        """The message item of a bundle going to ``rank``; None if every call
        in it was cancelled meanwhile."""
        tasks = self._tasks
        start_unwatched([sub.future for sub in subs])  # `_mark_running`'s usual case, for all at once
        attempt = self.scheduler.attempt(bundle_id)
        recorded = self.journal is not None or bool(self._listeners)
        live = []
        parts = []
        for sub in subs:
            future = sub.future
            task_id = future.task_id
            if tasks.get(task_id) is not sub:
                continue  # cancelled while it waited (counted then)
            if future._state != _RUNNING and not _mark_running(future):
                self._cancelled_outside(sub)  # cancelled just now
                continue
            live.append(sub)
            if recorded:
                self._mark_dispatched(sub, rank, attempt)
            else:  # the usual case: `_mark_dispatched`'s state, without a call per part
                future._task_state = TaskState.RUNNING
                future.rank = rank
            parts.append(_new_part(Part, (task_id, sub.call[0] if sub.args is None else sub.args)))
        if len(live) != len(subs):
            subs[:] = live
        if not live:
            del self._bundler.bundles[bundle_id]
            self.scheduler.withdraw(bundle_id, rank)
            return None
        # one function per bundle (`Bundler.take`): it rides on the bundle's item
        fn = _fn_ref(live[0].fn, sent_fns)
        awaited = self.scheduler.awaited(bundle_id)
        return TaskItem(bundle_id, attempt, fn, b"", (), (), None, None, awaited, tuple(parts))

    def _mark_dispatched(self, sub: Submission, rank: int, attempt: int) -> None:
        """A task (or a bundle's call) goes to ``rank``: its state, journal record and event."""
        future = sub.future
        future._task_state = TaskState.RUNNING
        future.rank = rank
        if self.journal is not None and sub.key is not None:
            self.journal.dispatched(sub.key, rank=rank, attempt=attempt, t=time.time())
        if self._listeners:
            self._emit("dispatched", task=future.task_id, key=sub.key, rank=rank, attempt=attempt)

    @staticmethod
    def _dep_value(dep: FarmFuture) -> tuple[int, bytes, tuple[Any, ...]]:
        if not dep.done():
            raise RuntimeError(f"input task {dep.task_id} is not done (a dispatch-order bug)")
        frame = dep.encoded_result()
        if frame is None:
            frame = ser.dumps(dep.result(0), "argument")
        return dep.task_id, frame[0], frame[1]


def _fn_ref(fn: tuple[bytes, bytes], sent: set[bytes]) -> FnRef:
    """A function in a message to a rank: in full the first time (``sent``
    holds what that rank has), by digest after."""
    digest, payload = fn
    if digest in sent:
        return FnRef(digest, None)
    sent.add(digest)
    return FnRef(digest, payload)


def _mark_running(future: FarmFuture) -> bool:
    """Move a future to RUNNING at dispatch; False if the user cancelled it."""
    state = future._state
    if state == _PENDING:
        return future._start()
    return state == _RUNNING  # a retry of a task already running
