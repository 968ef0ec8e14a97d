"""The service loop on rank 0: transport <-> scheduler <-> journal <-> futures.

Data flow (the service thread makes the MPI calls, in rounds; user threads
touch futures and the submission queue, except in the short cuts of
`taskfarm._shortcuts`)::

    user threads                     service thread                    worker ranks
    ------------                     --------------                    ------------
    submit() -> _Submission --+
                              |      1. receive    <-- Results/Heartbeat/Hello/Bye <--
                              |         (a speculative task won: --> Revoke its other copy -->)
    Future.cancel() ----------+      2. commit     (journal sync, then resolve futures)
                       (queue)+----> 3. take submissions and cancellations
                                     4. notice lost ranks (ULFM)
    Future.result() <-- futures <--- 5. dispatch   --> TaskBatch/Steal -->
                                        (held plain calls -> bundles, as ranks have room)
                                     6. progress sends
                                     7. wait       (backoff; a submit or a worker's ring wakes it at once)

Decisions (who runs what, retries, dependencies) are the scheduler's; this
module only carries them out.  A result is made durable in the journal before
its future resolves (`taskfarm._outcomes`: records, events, the commit).

The farm is one object, one state, whose methods come in layers, each a
class over the one below; a layer calls its own methods and those below it,
never those above::

    FarmState     (`taskfarm._farm_state`)  the record: tasks, ranks, submissions;
                                            failing a task, committing outcomes, events
    Dispatching   (`taskfarm._dispatch`)    steps 3-5: submissions taken in, held
                                            calls bundled, lost ranks, tasks sent
    ResultIntake  (`taskfarm._intake`)      step 1: what the workers send
    ShortCuts     (`taskfarm._shortcuts`)   the rounds user threads run on an idle farm
    Farm          (this module)             the service thread's loop (steps 2, 6, 7),
                                            draining and closing, the statistics
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from ._errors import BrokenFarmError, FarmStopped
from ._farm_state import Submission, _ExecutorInfo
from ._future import _RESOLVED
from ._outcomes import Listener, fail_future
from ._pools import PoolSpec
from ._protocol import Initializer, Kind, Stop
from ._scheduler import MAX_PREFETCH, PIPELINE_SECONDS
from ._shortcuts import ShortCuts
from ._signals import start_thread
from ._statistics import FarmStatistics, RankStatistics
from ._task import TaskState
from ._transport import DOORBELL_POLL_CAP, LARGE_SEND_NAP, POKED, RUNG, Backoff, ulfm_enabled

log = logging.getLogger("taskfarm.master")

#: longest sleep of the service thread while tasks are out (seconds): bounds
#: how late a result is noticed against the master's CPU while workers compute
#: (the delay doubles from the last activity: a result is noticed at most
#: about as late as it took to come; see `Farm._poll_cap`)
BUSY_POLL_CAP = 0.01
#: shortest such cap (tiny tasks behind a backlog, shallow pipelines)
BUSY_POLL_MIN = 0.0002
#: longest sleep while nothing is out; only Hello/Bye can arrive then
IDLE_POLL_CAP = 0.05
#: the same once every rank has said Hello and rings: a message wakes the
#: service thread itself, and so does every call from a user thread
IDLE_RINGING_CAP = 1.0
#: how long close() waits for every worker's Bye before giving up on it
BYE_TIMEOUT = 30.0
#: the same after a drain, when workers may still be inside cut-off tasks
DRAIN_BYE_TIMEOUT = 2.0
#: the same for a rank declared lost by its heartbeat: a woken one answers in
#: milliseconds, one still stopped is not waited for long (the job is aborted)
LOST_BYE_TIMEOUT = 5.0
#: GIL switch interval while a farm runs (seconds; Python's default is 5 ms).
#: The service thread takes and drops the GIL many times a round (each MPI and
#: socket call releases it); a user thread running Python meanwhile (a burst
#: of submits, a loop over results) holds it up to the full interval each
#: time.  At 5 ms a round took 10-20 ms and ranks sat idle; 1 ms took 1 ms
#: tasks' efficiency (2 workers, 2,000 submits) 0.926-0.932 -> 0.939-0.943.
#: At 1 ms the round of a 2,000-submit burst still took as long as the burst
#: (~10 ms): the second rank's first task waited 8-21 ms (12 bursts), with a
#: core idle.  50 us: skewed submits -0.60 +- 0.22 points, the cores' idle
#: time -0.49 +- 0.12 (10 interleaved pairs), 1 ms tasks and no-op submits
#: unchanged; 200 us read alike (8 pairs).  Workers keep 1 ms
#: (`_worker.WORKER_SWITCH_INTERVAL`): their slot runs the task, holding the GIL.
MASTER_SWITCH_INTERVAL = 0.00005

#: a submit sends a task for an idle rank itself, while other tasks run (see
#: `Farm.submit`), only if the submit before it came this long before
#: (seconds).  A stream of submits is the service thread's: it takes them in
#: batches on its own core, where the submitting thread would pay a round
#: (tens of us) for each task, and its calls would go one by one, unbundled.
SUBMIT_APART = 0.001


class Farm(ShortCuts):
    """Rank 0's side of a farm: owns the transport and the service thread."""

    def _start(self) -> None:
        """The record is complete (`FarmState.__init__`): answer the Hellos
        once the pool is known, speed up GIL switching, start the service thread."""
        if self._configured:
            self._apply_configuration()
        self._switch_interval = _fast_switching()
        self._last_submit = 0.0  # monotonic time of the last submit (`SUBMIT_APART`)
        self._thread = start_thread(threading.Thread(target=self._serve, name="taskfarm-master", daemon=True))

    # -- called from user threads -------------------------------------------
    def configure(self, pool: PoolSpec | None, master_works: bool | None) -> None:
        """Fix the pool settings if nobody has yet (the first executor does, in world mode).

        Settings given explicitly that differ from the farm's raise ValueError:
        one farm has one pool (``taskfarm run --pool`` or the first executor sets it).
        """
        with self._submit_lock:
            if self._configured:
                if pool is not None and pool != self.pool:
                    raise ValueError(
                        f"this farm already runs pool={self.pool.kind!r} with concurrency {self.pool.concurrency}; "
                        "the pool is set once per farm (taskfarm run --pool, or the first executor)"
                    )
                if master_works is not None and bool(master_works) != self.master_works:
                    raise ValueError(
                        f"this farm already runs with master_works={self.master_works}; it is set once per farm"
                    )
                return
            self._configured = True
            self.pool = pool or PoolSpec()
            self.master_works = bool(master_works)
            self._submissions.append(("configure", None))
        self._wake()

    def add_executor(self, executor_id: int, initializer: Initializer | None) -> None:
        """Tasks of this executor carry ``initializer`` to each worker's first batch."""
        self._submissions.append(("executor", _ExecutorInfo(executor_id, initializer)))
        self._wake()

    def submit(self, sub: Submission) -> None:
        sub.future._cancel_hook = self._cancel_hook
        with self._submit_lock:
            if self._broken is not None:
                raise BrokenFarmError(str(self._broken))
            if self.drained or self._drain_grace is not None:
                raise FarmStopped("the farm is draining (signal or deadline): no new tasks")
            if self._stopped:
                raise RuntimeError("cannot schedule new futures after the farm has ended")
            self._submissions.append(sub)
        # the farm's only unfinished task, or a rank sits idle with nothing
        # else waiting for one and no stream of submits under way, and the
        # service thread asleep: send it from here (`taskfarm._shortcuts`)
        now = time.monotonic()
        apart, self._last_submit = now - self._last_submit > SUBMIT_APART, now
        if not self._tasks or (
            apart and self.scheduler.has_idle_rank() and len(self._submissions) == 1 and not self._backlog()
        ):
            if self._inline_round(receive=False, wait=False) is None:
                self._wake()
        else:
            self._wake()
        if self._listened is not None:
            self.transport.wakeup.poke_listener()  # its task is the farm's only one no more

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event, fields)`` at every state change, in the
        thread that runs the farm's round (the service thread, or a user
        thread taking a short cut on an idle farm).

        Listeners must be quick and must not raise; they see events from the
        moment they are added.
        """
        self._listeners.append(listener)

    def drain(self, grace: float) -> None:
        """Stop dispatching; give running tasks ``grace`` seconds, then end the farm.

        Safe to call from a signal handler.  Futures still unresolved then fail
        with `FarmStopped`; the journal keeps what finished, for ``--resume``.
        """
        if self._drain_grace is None:
            self._drain_grace = grace
        self._wake()

    def abandon(self) -> None:
        """End the farm without waiting for its remaining tasks (the program failed).

        Unlike `drain`, the run is not marked resumable-incomplete: the
        program's own error is the outcome.
        """
        self._abandoned = True
        self.drain(0.0)

    _abandoned = False

    def drain_at(self, when: float, grace: float) -> None:
        """Start draining by itself at monotonic time ``when`` (a walltime deadline)."""
        self._drain_at = when
        self._deadline_grace = grace
        self._wake()

    _deadline_grace = 0.0

    def statistics(self) -> FarmStatistics:
        """A consistent snapshot, taken by the service thread."""
        if self._thread.is_alive():
            self._snapshot_ready.clear()
            self._snapshot_wanted.set()
            self._wake()
            self._snapshot_ready.wait(timeout=5.0)
        if self._snapshot is None:
            self._snapshot = self._take_snapshot()
        return self._snapshot

    def close(self) -> list[int]:
        """Finish the tasks, stop every worker and the service thread.

        Returns the worker ranks that did not say Bye in time (stuck in a task);
        the caller ends the job with `Transport.abort` after saving what it must.
        """
        self._closing = True
        self._wake()
        self._thread.join()
        _restore_switching(self._switch_interval)
        if self.transport.intercomm:
            self.transport.close()
        if self.journal is not None and self.resume is not None and self.resume.refused:
            self.journal.discard()  # the journal holds other work: leave it as it was
        elif self.journal is not None:
            s = self._snapshot
            status = "drained" if self.drained else ("broken" if self._broken else "complete")
            self.journal.run_ended(
                {
                    "time": time.time(),
                    "status": "abandoned" if self._abandoned else status,
                    "done": s.done if s else None,
                    "failed": s.failed if s else None,
                }
            )
            self.journal.close()
        return self.unanswered

    # -- the service thread ------------------------------------------------
    def _serve(self) -> None:
        self._round.acquire()  # let go only while asleep (`_wait`)
        backoff = Backoff(BUSY_POLL_CAP)
        cpu0 = time.thread_time()
        try:
            while True:
                got = self._receive()
                progressed = got
                if self._commit():
                    self._wake_listener()
                    # a user thread waits on a future just resolved: the rest of
                    # this round would hold the GIL it wakes up to (~60 us of an
                    # idle farm's round trip); yielding lets it have it first, and
                    # the round too: its next submit may be sent at once
                    self._nap()
                progressed |= self._take_submissions()
                progressed |= self._notice_lost()
                if self._draining():
                    if self.scheduler.in_flight() == 0 or time.monotonic() > (self._drain_until or 0):
                        self._end_drain()
                        break
                else:
                    progressed |= self._dispatch_if_due(progressed)
                sending = self.transport.progress(push=not self._all_ring())  # ringing workers say when they took it
                if self._snapshot_wanted.is_set():
                    self._service_cpu = time.thread_time() - cpu0
                    self._snapshot = self._take_snapshot()
                    self._snapshot_wanted.clear()
                    self._snapshot_ready.set()
                if self._closing and not self._submissions and (
                    not self._has_work() or self._broken is not None
                ):
                    break  # done; or broken: its tasks have failed, nothing can run them
                if progressed and self.scheduler.live_workers() == 0 and self._all_peers_gone():
                    self._break(BrokenFarmError("every worker rank of the farm was lost"))
                if progressed:
                    if got:  # what rang came in; a ring with nothing found yet keeps its rechecks
                        self._rung = False
                        self._rechecks.found()
                    if not self._backlog() or self.scheduler.prefetch >= MAX_PREFETCH:
                        backoff.reset()  # results are awaited: poll sooner (unless ranks ring)
                    # else: every rank holds a deep pipeline (long tasks, a backlog): no hurry
                    self._nap()
                elif sending:
                    if self._all_ring():
                        self.transport.wait(LARGE_SEND_NAP)  # workers ring when they have taken a large send
                    else:
                        time.sleep(0)
                else:
                    self._wait(backoff)
            self._stop_workers()
        except BaseException as exc:
            log.exception("taskfarm service thread failed")
            self._break(BrokenFarmError(f"the farm's service thread failed: {exc!r}"))
            self._commit()
        finally:
            with self._submit_lock:
                self._stopped = True
                late = [s for s in self._submissions if type(s) is not tuple]
                self._submissions.clear()
            error = RuntimeError("the farm ended before this task could be scheduled")
            for sub in late:
                fail_future(sub.future, FarmStopped(str(error)) if self.drained else error)
            self._service_cpu = time.thread_time() - cpu0
            self._snapshot = self._take_snapshot()
            self._snapshot_ready.set()
            self._round.release()
            self._wake_listener()

    def _nap(self) -> None:
        """``sleep(0)``, letting go of the GIL and of the round: after a round
        that made progress, and after step 2 resolved an awaited future.  A
        user thread's next submit on a farm run back to back finds the round
        free (`taskfarm._shortcuts`).  Held through these naps, the round was
        always taken then, and once the service thread had taken one result
        it took every later one (the short cuts were taken in 0 of 20 round
        trips in 3 runs of 8)."""
        self._sleep_until = 0.0  # a round follows at once: no user thread need poke
        self._round.release()
        try:
            time.sleep(0)
        finally:
            self._round.acquire()

    def _wake_listener(self) -> None:
        """A user thread listening for a future this thread resolved: wake it."""
        listened = self._listened
        if listened is not None and listened._state in _RESOLVED:
            self.transport.wakeup.poke_listener()

    def _draining(self) -> bool:
        if self._drain_grace is None and self._drain_at is not None and time.monotonic() >= self._drain_at:
            log.warning("deadline near: draining the farm")
            self._drain_grace = self._deadline_grace
        if self._drain_grace is not None and self._drain_until is None:
            self._drain_until = time.monotonic() + self._drain_grace
            if self._abandoned:
                log.info("abandoning the farm's %d unfinished task(s)", len(self._tasks))
            else:
                log.warning(
                    "draining: no new tasks; %d running get %.0f s to finish",
                    self.scheduler.in_flight(),
                    self._drain_grace,
                )
        return self._drain_grace is not None

    def _end_drain(self) -> None:
        """Fail what did not finish; the journal lets a rerun complete it."""
        self.drained = not self._abandoned
        if self._listeners:
            self._emit("drained", unfinished=len(self._tasks))
        error = FarmStopped(
            "the farm stopped early (signal or deadline); finished results are in the journal, "
            "rerun with --resume for the rest"
        )
        state = self.scheduler.state
        for task_id in list(self._tasks):
            task = self._tasks.pop(task_id)
            self._outcomes.fail(task.future, error)
            bundle = task.future._bundle
            if task.key is not None and state(bundle if bundle > 0 else task_id) is TaskState.RUNNING:
                self._cut[task_id] = task.key
        self._bundler.clear()
        while self._submissions:
            sub = self._submissions.popleft()
            if type(sub) is not tuple:
                self._outcomes.fail(sub.future, error)
        self._commit()
        self._closing = True

    def _poll_cap(self) -> float:
        """How long the service thread may sleep while tasks are out and it
        must poll: while ready tasks wait for room, a quarter of the ranks'
        pipeline depth (they run from their queues meanwhile); else `BUSY_POLL_CAP`."""
        if not self._backlog():
            return BUSY_POLL_CAP
        depth = min(PIPELINE_SECONDS, (1 + self.scheduler.prefetch) * (self.scheduler._mean_duration or 0.0))
        return min(BUSY_POLL_CAP, max(BUSY_POLL_MIN, depth / 4))

    def _wait(self, backoff: Backoff) -> None:
        """Step 7: sleep until a message (its ring), a user thread's call, a
        timed task, or, where ranks cannot ring, the next poll."""
        busy = self._has_work()
        ringing = self._all_ring()
        if ringing:  # every message rings: sleep until one does
            if self._rung:
                self._rechecks.rang_empty()
            delay = self._rechecks.next_delay(DOORBELL_POLL_CAP if busy else IDLE_RINGING_CAP)
        elif busy:
            backoff.cap = self._poll_cap()
            delay = backoff.next()
        else:
            delay = IDLE_POLL_CAP
        if delay == 0.0:
            self._nap()
            return
        wakeup = self.scheduler.next_wakeup() if self._drain_grace is not None else self._next_dispatch
        if self._drain_at is not None:
            wakeup = self._drain_at if wakeup is None else min(wakeup, self._drain_at)
        if self._drain_until is not None:
            wakeup = self._drain_until if wakeup is None else min(wakeup, self._drain_until)
        if wakeup is not None and wakeup < float("inf"):
            delay = max(0.0, min(delay, wakeup - time.monotonic()))
        self._wake_listener()  # its future may have been resolved by another step than the commit
        self._sleep_until = time.monotonic() + delay
        self._round.release()  # a user thread may run a round meanwhile (`taskfarm._shortcuts`)
        try:
            woken = self.transport.wait(delay)
        finally:
            self._round.acquire()
        self._rung = self._rings_taken = bool(woken & RUNG)
        if woken & POKED and not ringing:
            backoff.restart()  # fresh work: its results are awaited, poll for them

    # -- ending ------------------------------------------------------------
    def _all_peers_gone(self) -> bool:
        return bool(self._peers) and all(self.scheduler.is_lost(p) for p in self._peers)

    def _stop_workers(self) -> None:
        """Send Stop to every worker whose process lives, and collect their Byes.

        A rank declared lost by its heartbeat (stopped, hung, or slow and woken
        since) is told to stop too: left alone it would keep the job from
        ending.  It gets `LOST_BYE_TIMEOUT` to answer; a rank that does not
        answer ends up in ``unanswered`` and the caller aborts the job.
        """
        failed = self.transport.failed
        targets = [p for p in self._peers if not failed(p)]
        silent = {p for p in targets if self.scheduler.is_lost(p)}
        self._stop_sent = True
        for peer in targets:
            if peer in self._byes:
                continue  # it left already (an error of its own)
            if peer in silent:
                self.transport.unforget(peer)
            self.transport.send(peer, Kind.STOP, Stop("farm closed"))
        # after a drain, a worker still busy is cut off by the walltime anyway
        start = time.monotonic()
        deadline = start + (DRAIN_BYE_TIMEOUT if self.drained else BYE_TIMEOUT)
        silent_deadline = min(deadline, start + LOST_BYE_TIMEOUT)
        backoff = Backoff(10 * BUSY_POLL_MIN)  # Byes come within milliseconds
        while True:
            self._receive()
            self._notice_lost()
            self.transport.progress()
            now = time.monotonic()
            missing = [
                p
                for p in targets
                if p not in self._byes and not failed(p) and now < (silent_deadline if p in silent else deadline)
            ]
            if not missing:
                break
            time.sleep(backoff.next())
        self.unanswered = [p for p in targets if p not in self._byes and not failed(p)]
        self.transport.flush(timeout=5.0)

    def _take_snapshot(self) -> FarmStatistics:
        s = self.scheduler.statistics()
        wall = time.monotonic() - self._started
        ranks = {}
        for rank, r in s.ranks.items():
            bye = self._byes.get(rank)
            overhead = None
            slot_busy = None
            life = wall
            if bye is not None and bye.wall_time > 0:
                overhead = max(0.0, bye.cpu_time - bye.task_cpu_time) / bye.wall_time
                slot_busy = tuple(b / bye.wall_time for b in bye.slot_busy)
                life = bye.wall_time
            ranks[rank] = RankStatistics(
                host=self._hosts.get(rank, "?"),
                slots=r.slots,
                tasks=r.tasks,
                failed=r.failed,
                busy_time=r.busy_time,
                alive=r.alive,
                overhead_cpu_fraction=overhead,
                pool=bye.pool if bye is not None else None,
                busy_fraction=r.busy_time / (r.slots * life) if life > 0 else None,
                slot_busy_fraction=slot_busy,
                child_restarts=bye.child_restarts if bye is not None else None,
                doorbell=bye.rung and self.transport.rings_from(rank) if bye is not None else None,
            )
        return FarmStatistics(
            submitted=s.submitted + self._bundler.live,
            done=s.done,
            failed=s.failed,
            cancelled=s.cancelled,
            retried=s.retried,
            resubmitted=s.resubmitted,
            stolen=s.stolen,
            zombies=s.zombies,
            duplicates=s.duplicates,
            speculated=s.speculated,
            bundled=self._bundler.bundled,
            pending=s.pending + self._bundler.live,
            running=s.running,
            workers=sum(1 for r in s.ranks.values() if r.alive),
            lost_ranks=s.lost_ranks,
            wall_time=wall,
            master_cpu_fraction=(self._service_cpu + self._inline_cpu) / wall if wall > 0 else 0.0,
            submit_rounds=self._submit_rounds,
            result_rounds=self._result_rounds,
            prefetch=self.scheduler.prefetch,
            mpi=self._mpi,
            ranks=ranks,
            drained=self.drained,
            resume=None if self.resume is None else self.resume.summary(),
            journal_bytes=None if self.journal is None else self.journal.bytes_written,
            pool=self.pool.kind,
            concurrency=self.pool.concurrency,
            master_works=self.master_works,
            ulfm=ulfm_enabled(),
        )


def _fast_switching() -> float:
    """Shorten the process's GIL switch interval to `MASTER_SWITCH_INTERVAL`
    (never lengthen it); returns the interval it had, for `_restore_switching`."""
    previous = sys.getswitchinterval()
    if previous > MASTER_SWITCH_INTERVAL:
        sys.setswitchinterval(MASTER_SWITCH_INTERVAL)
    return previous


def _restore_switching(previous: float) -> None:
    """Undo `_fast_switching`, unless the program has set an interval of its own since."""
    if _switching_is(MASTER_SWITCH_INTERVAL):
        sys.setswitchinterval(previous)


def _switching_is(interval: float) -> bool:
    """True if the GIL switch interval is ``interval``: Python keeps it in whole
    microseconds, so 50 us reads back as 4.9999999999999996e-05."""
    return round(sys.getswitchinterval() * 1e6) == round(interval * 1e6)
