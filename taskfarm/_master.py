"""The service loop on rank 0: transport <-> scheduler <-> journal <-> futures.

Data flow (the service thread makes the MPI calls, in rounds; user threads
touch futures and the submission queue, except in the short cuts below)::

    user threads                     service thread                    worker ranks
    ------------                     --------------                    ------------
    submit() -> _Submission --+
                              |      1. receive    <-- Results/Heartbeat/Hello/Bye <--
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

Short cuts on an idle farm.  A round (steps 1-6) runs under `Farm._round`,
which the service thread holds except while it sleeps (step 7, and its
``sleep(0)`` naps: `Farm._nap`).  When a user thread submits the one
unfinished task of the farm and that lock is free, the user thread runs
the round itself and sends the task; when it
then waits in ``result()`` for the farm's only task, it sleeps on the
doorbell in the service thread's stead (`Wakeup.listen`: the result's ring
wakes it first) and runs the round that takes the result; a submit while it
listens pokes it, and it gives the doorbell back.  The service
thread sleeps through both, and is poked only when its planned sleep no
longer fits (`Farm._after_inline_round`).  That takes two of the four
thread wake-ups off an idle farm's round trip, ~0.2 ms on a 2-core VM where
a woken thread lands on an idle, cold core (docs/performance.md, tenth
round).  The submit's round also rings the task's rank before it takes the
submission in (`Farm._ring_ahead`), so that the rank wakes while this thread
prepares and sends the task, not after it (fourteenth round).  MPI is
initialised for ``MPI_THREAD_MULTIPLE`` and the lock keeps its calls to one
thread at a time, as on a worker (`_worker.Worker._mpi_lock`).  A busy farm
takes neither short cut: its threads already run and are woken by nothing.

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

import collections
import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from . import _serialization as ser
from ._bundles import BUNDLE_CALL_BYTES, HELD, UNTIMED_DEPTH, Bundler
from ._errors import (
    BrokenFarmError,
    DependencyFailed,
    FarmStopped,
    MaxRetriesExceededError,
    TaskExpired,
    TimeLimitExceeded,
    WorkerLostError,
)
from ._future import _CANCELLED, _PENDING, _RESOLVED, _RUNNING, FarmFuture, start_unwatched
from ._journal_writer import JournalWriter
from ._loopback import Loopback
from ._outcomes import Listener, Outcomes, decode_error, fail_future
from ._pools import PoolSpec
from ._protocol import (
    PROTOCOL_VERSION,
    Bye,
    FnRef,
    Hello,
    Initializer,
    Kind,
    Part,
    PartResult,
    ResultBatch,
    ResultItem,
    Steal,
    Stop,
    TaskBatch,
    TaskItem,
)
from ._resume import ResumeIndex
from ._scheduler import MAX_PREFETCH, PIPELINE_SECONDS, Decision, Scheduler
from ._signals import NOT_STORED, hold_main_thread_signals, release_main_thread_signals, start_thread
from ._statistics import FarmStatistics, RankStatistics
from ._task import TaskPolicy, TaskState
from ._transport import (
    DOORBELL_POLL_CAP,
    LARGE_SEND_NAP,
    POKED,
    RING_RECHECKS,
    RUNG,
    Backoff,
    Rechecks,
    Transport,
    library,
    ulfm_enabled,
)
from ._trials import Trial
from ._worker import serve_in_thread

log = logging.getLogger("taskfarm.master")

#: longest sleep of the service thread while tasks are out (seconds): bounds
#: how late a result is noticed against the master's CPU while workers compute
#: (the delay doubles from the last activity: a result is noticed at most
#: about as late as it took to come; see `Farm._poll_cap`)
BUSY_POLL_CAP = 0.01
#: shortest such cap (tiny tasks behind a backlog, shallow pipelines)
BUSY_POLL_MIN = 0.0002
#: with nothing happening, the scheduler is still consulted this often (seconds):
#: ready tasks expire while every rank is full
DISPATCH_PERIOD = 0.05
#: longest sleep while nothing is out; only Hello/Bye can arrive then
IDLE_POLL_CAP = 0.05
#: the same once every rank has said Hello and rings: a message wakes the
#: service thread itself, and so does every call from a user thread
IDLE_RINGING_CAP = 1.0
#: a worker silent this long while holding tasks is declared lost (seconds)
DEFAULT_HEARTBEAT_TIMEOUT = 300.0
#: workers send heartbeats this many times per heartbeat timeout
HEARTBEATS_PER_TIMEOUT = 4
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
#: a lone task's submit may ring its rank early (`Farm._ring_ahead`) only
#: once the farm has had no result for this long (seconds).  A rank that sent
#: one more recently sleeps on a warm core, and the early ring only cost it an
#: empty round: back to back, +0.02 ms (MPICH) and -0.02 (Open MPI) on an
#: Intel VM, +0.046 +- 0.011 and +0.150 +- 0.014 ms on an AMD one (interleaved
#: pairs).  The idle round trips it is for follow pauses of tens of ms.
RING_AHEAD_QUIET = 0.005
#: idle round trips timed each way, rung early and not, before the farm keeps
#: the faster (`taskfarm._trials.Trial`).  On the AMD VM, 5 ranks, the ways
#: differ by 0.08 ms (MPICH) to 0.17 ms (Open MPI) against round trips that
#: vary by ~0.1 ms: with 8 each, one MPICH farm in 3 kept the slower way
#: (Open MPI: none in 3); with 12, none in 3, for 8 more round trips taken
#: the slower way while the farm learns
RING_AHEAD_SAMPLES = 12
#: a bundle's policy to the scheduler: its calls have the default one (no retries)
_BUNDLE_POLICY = TaskPolicy()


class Submission(NamedTuple):
    """Everything the service thread needs to run one task."""

    future: FarmFuture
    executor_id: int
    fn: tuple[bytes, bytes]  # digest, dill payload
    call: ser.Frame
    inputs: tuple[FarmFuture, ...]
    policy: TaskPolicy
    priority: int
    not_before: float | None  # monotonic
    expires: float | None  # wall clock
    time_limit: float | None
    key: str | None  # journal key; None when no journal is kept
    #: may ride in a bundle with other calls (map's chunks, sized already, may not)
    bundle: bool = True
    #: the positional arguments themselves when all are `ser.SCALARS` and there
    #: are no keyword arguments (nor a journal, which keys a call by its pickle):
    #: then ``call`` is empty, and they travel as they are (`wire_call`, a bundle's `Part`)
    args: tuple[Any, ...] | None = None

    def wire_call(self) -> tuple[bytes | tuple[Any, ...], tuple[Any, ...]]:
        """The call as a task of its own sends it (`TaskItem.call` and
        ``buffers``): scalar arguments as they are, as a bundle's parts send
        them; the pickle is another ~30 us of an idle farm's round trip, cold."""
        return self.call if self.args is None else (self.args, ())


#: a `Part` made as the tuple it is: NamedTuple's own ``__new__`` is a Python
#: function, another call for each of a bundle's calls
_new_part = tuple.__new__

#: a Submission's ``call`` while its arguments ride as they are (``Submission.args``)
NOT_PICKLED: ser.Frame = (b"", ())


class _ExecutorInfo(NamedTuple):
    executor_id: int
    initializer: Initializer | None


class Farm:
    """Rank 0's side of a farm: owns the transport and the service thread."""

    def __init__(
        self,
        transport: Transport,
        *,
        heartbeat_timeout: float | None = DEFAULT_HEARTBEAT_TIMEOUT,
        max_workers: int | None = None,
        journal: JournalWriter | None = None,
        resume: ResumeIndex | None = None,
        run_meta: Mapping[str, Any] | None = None,
        pool: PoolSpec | None = None,
        master_works: bool | None = None,
    ) -> None:
        self.transport = transport
        self.journal = journal
        self.resume = resume
        #: set once the farm stopped early (signal, deadline): its work is incomplete
        self.drained = False
        self._drain_grace: float | None = None  # set by drain(): seconds for running tasks
        self._drain_until: float | None = None
        self._drain_at: float | None = None  # monotonic time to start draining (deadline)
        if journal is not None:
            journal.run_started({"time": time.time(), "workers": len(transport.peers()), **(run_meta or {})})
        self.scheduler = Scheduler(heartbeat_timeout=heartbeat_timeout, max_workers=max_workers)
        self.heartbeat_timeout = heartbeat_timeout
        self._peers = transport.peers()
        self._submissions: collections.deque[Any] = collections.deque()
        #: `_cancel` bound once: every future shares it (a bound method per
        #: future is one more object for the garbage collector to track)
        self._cancel_hook = self._cancel
        self._wake = transport.poke  # user threads: work for the service thread (wakes `_wait`)
        #: (ringers, live ranks, ranks that said Hello, all ring) when last counted
        self._ringing: tuple[int, int, int, bool] = (0, 0, 0, False)
        self._rung = False  # a ring came since the last round that took a message
        self._rings_taken = False  # the last wait, ended by a ring, took the rings waiting
        self._rechecks = Rechecks(RING_RECHECKS)  # after a ring that found nothing
        self._next_dispatch = 0.0  # monotonic time the scheduler must be polled by
        self.pool = pool or PoolSpec()
        self.master_works = bool(master_works)
        #: pool settings fixed, at construction or by the first executor (`configure`);
        #: until they apply, workers' Hellos wait (a worker's first word back is Config)
        self._configured = pool is not None or master_works is not None
        self._ready = False
        self._parked: list[tuple[int, Hello]] = []
        if self._configured:
            self._apply_configuration()
        #: a task's submission from its admission to its outcome
        self._tasks: dict[int, Submission] = {}
        #: after a drain's grace (`_end_drain`), the journal keys of the calls
        #: it cut off while they ran, by task id: a success of theirs that comes
        #: before the Byes is still journaled (`_on_late`), so that a resumed
        #: run does not redo it
        self._cut: dict[int, str] = {}
        #: plain calls waiting to be bundled, and the bundles (see "Bundles");
        #: a cancelled held call is skipped when taken (no longer in ``_tasks``)
        self._bundler: Bundler[Submission] = Bundler()
        self._executors: dict[int, _ExecutorInfo] = {}
        #: task ids, from any user thread: ``next()`` on a count is one C call,
        #: atomic under the GIL (as `threading` numbers its threads), where a
        #: lock round trip cost a submit ~0.2 us
        self._task_ids = itertools.count(1)
        self._next_executor_id = 0
        self._id_lock = threading.Lock()
        self._hosts: dict[int, str] = {}
        self._byes: dict[int, Bye] = {}
        self._fn_sent: dict[int, set[bytes]] = collections.defaultdict(set)
        self._init_sent: dict[int, set[int]] = collections.defaultdict(set)
        self._closing = False
        self._stopped = False
        self._submit_lock = threading.Lock()
        self._listeners: list[Listener] = []
        #: outcomes on their way to the journal, the listeners and the futures (step 2)
        self._outcomes = Outcomes(self.journal, self._listeners, self._emit)
        self.unanswered: list[int] = []
        self._broken: BaseException | None = None
        self._snapshot: FarmStatistics | None = None
        self._snapshot_wanted = threading.Event()
        self._snapshot_ready = threading.Event()
        self._started = time.monotonic()
        self._service_cpu = 0.0
        self._mpi = str(library()["library"])
        self._switch_interval = _fast_switching()
        #: held by the thread running a round: the service thread, but while it
        #: sleeps (step 7), or a user thread taking a short cut (see "Short cuts")
        self._round = threading.Lock()
        self._round_owner = 0  # that user thread's ident while it runs a round
        self._sleep_until = 0.0  # monotonic time the service thread's sleep ends
        #: a user thread waiting on the doorbell for the farm's only task: there is one doorbell listener
        self._listening = threading.Lock()
        self._listened: FarmFuture | None = None
        self._inline_cpu = 0.0  # time the rounds user threads ran took (they do not block)
        #: rounds user threads ran in `submit` and in `wait_here` (see "Short cuts")
        self._submit_rounds = 0
        self._result_rounds = 0
        #: whether a lone task's rank is rung early here (see `_ring_ahead`)
        self._ring_trial = Trial(RING_AHEAD_SAMPLES)
        #: (task id, monotonic time of its submit's round, rung early) of the
        #: idle round trip being timed for the trial
        self._timed_trip: tuple[int, float, bool] | None = None
        self._last_result = 0.0  # monotonic time the last result message came
        self._thread = start_thread(threading.Thread(target=self._serve, name="taskfarm-master", daemon=True))

    # -- called from user threads -------------------------------------------
    def new_task_id(self) -> int:
        return next(self._task_ids)

    def new_executor_id(self) -> int:
        with self._id_lock:
            self._next_executor_id += 1
            return self._next_executor_id

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
        # the farm's only unfinished task, and the service thread asleep: send
        # it from here (see "Short cuts" in the module docstring)
        if self._tasks or self._inline_round(receive=False, wait=False) is None:
            self._wake()
            if self._listened is not None:
                self.transport.wakeup.poke_listener()  # its task is the farm's only one no more

    def resolves_here(self) -> bool:
        """True in the thread that runs a round now: the service thread, or a
        user thread in a short cut.  It resolves the futures (and runs their
        callbacks), so a wait there for one not yet resolved would never end."""
        me = threading.get_ident()
        return me == self._thread.ident or me == self._round_owner

    def _only_task_left(self) -> bool:
        """One unfinished task, and no other on its way in: the farm a
        listening thread (`wait_here`) may take the result of."""
        return len(self._tasks) == 1 and not self._submissions

    def wait_here(self, future: FarmFuture, timeout: float | None) -> float | None:
        """Called by a thread about to wait for ``future``: if it is the farm's
        only task and rings come, take its result in this thread (see "Short
        cuts").  Returns the rest of ``timeout`` for the usual wait, which
        finds the future resolved unless this thread could not take it."""
        wakeup = self.transport.wakeup
        if (
            not self._only_task_left()
            or future.task_id not in self._tasks
            or not self._ringing[3]  # the service thread's `_all_ring`, as last counted
            or self.resolves_here()  # a done-callback's (a zero timeout: `FarmFuture._wait`)
            or self._service_only()
            or isinstance(self.transport, Loopback)  # rank 0's own worker pokes, it does not ring
            or not wakeup.can_listen()
            or not self._listening.acquire(blocking=False)  # one listener at a time
        ):
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._listened = future
        rechecks = Rechecks(RING_RECHECKS)  # as the service thread's, after a ring whose probe found nothing
        try:
            while future._state not in _RESOLVED:
                if not self._only_task_left():
                    # the farm's only task no more: the rings are the service
                    # thread's again, and this thread waits as any other does
                    # (a main thread in slices, so that signal handlers run)
                    self._wake()
                    break
                # else as the service thread's safety net (a ring lost between nodes)
                nap = rechecks.delay(DOORBELL_POLL_CAP)
                if deadline is not None:
                    nap = min(nap, deadline - time.monotonic())
                    if nap <= 0.0:
                        break
                woken = wakeup.listen(nap)
                if woken == POKED or future._state in _RESOLVED:
                    continue  # the service thread resolved it (it pokes this listener)
                got = self._inline_round(receive=True, wait=True, rung=bool(woken & RUNG))
                if got is None:  # the farm ends or drains: the service thread's work alone
                    self._wake()  # the rings this thread took announced messages for it
                    break
                rechecks.probed(got, bool(woken & RUNG))
        finally:
            self._listened = None
            self._listening.release()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _inline_round(self, *, receive: bool, wait: bool, rung: bool = False) -> bool | None:
        """Steps 1-6 in a user thread (see "Short cuts"), taking `_round`
        (``wait``: until it is free); True if a message came.  None if the
        round was not free, or the farm ends or drains (`_service_only`): the
        caller pokes the service thread.  Step 1 only with ``receive`` (a submit's round
        leaves messages to the thread their rings wake); ``rung``: the
        caller's `Wakeup.listen` took the rings waiting, as the service
        thread's `_wait` does.  The main thread's signals are held from
        before the round is taken to after it is let go: a KeyboardInterrupt
        raised in between would leave the round taken for good, or the
        scheduler and the transport half changed."""
        held = NOT_STORED
        try:
            held = hold_main_thread_signals()
            if not self._round.acquire(wait):
                return None
            try:
                if self._service_only():
                    return None
                self._round_owner = threading.get_ident()
                self._rings_taken = rung
                return self._inline_steps(receive)
            finally:
                self._round_owner = 0
                self._round.release()
        finally:
            release_main_thread_signals(held)

    def _inline_steps(self, receive: bool) -> bool:
        """`_inline_round`'s steps, its error breaking the farm as one in the
        service thread does."""
        # wall time: such a round does not block, and thread_time() is a system
        # call (~5 us each, run cold), where monotonic() is not
        t0 = time.monotonic()
        got = False
        try:
            if receive:
                got = self._receive()
                self._commit()
            elif not self._tasks:
                self._ring_ahead(t0)
            self._dispatch_if_due(got | self._take_submissions() | self._notice_lost())
            sending = self.transport.progress(push=not self._all_ring())
            self._commit()  # what the submissions and the dispatch resolved (cancelled inputs, lost ranks)
            if got:
                self._rung = False
                self._rechecks.found()
            self._after_inline_round(sending)
        except BaseException as exc:
            log.exception("taskfarm round in a user thread failed")
            self._break(BrokenFarmError(f"the farm's round in a user thread failed: {exc!r}"))
            self._wake()
        finally:
            self._inline_cpu += time.monotonic() - t0
            if receive:
                self._result_rounds += 1
            else:
                self._submit_rounds += 1
        return got

    def _ring_ahead(self, now: float) -> None:
        """On an idle farm, before a plain submission is taken in: ring the
        rank its task will go to, which wakes (finds nothing yet, and sleeps
        again) while this thread prepares and sends the task; the ring after
        the send then finds it awake, or just asleep on a warm core.

        Whether that pays depends on the machine, so the farm times its
        first idle round trips both ways and keeps the faster
        (`taskfarm._trials.Trial`).  On a 2-core Intel VM, where a rank woke
        ~0.3 ms after its ring on the other, idle vCPU, ringing early took
        0.16 +- 0.02 ms off the round trip (10 interleaved pairs).  On an AMD
        VM whose kernel packs woken tasks onto the busy vCPU, the rank woke
        on the master's own vCPU about half the time and held it up:
        +0.08 +- 0.02 ms on MPICH, +0.19 +- 0.03 on Open MPI (12 pairs).
        Also tried: the rank probing without sleeping until its task came
        (a rank spinning as a burst of submits began lost its core to the
        master for up to 15 ms), and a later ring, just before the send (no
        better on the AMD VM).  A farm that had a result within
        `RING_AHEAD_QUIET` never rings early."""
        sub = self._submissions[0] if self._submissions else None
        if (
            type(sub) is not Submission
            or sub.inputs
            or sub.not_before is not None
            or now - self._last_result < RING_AHEAD_QUIET
            or not self._all_ring()
        ):
            return
        rank = self.scheduler.next_rank()
        if rank is None:
            return
        early = self._ring_trial.choose()
        if self._ring_trial.decided is None:
            self._timed_trip = (sub.future.task_id, now, early)
        if early:
            self.transport.ring(rank)

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

    def _service_only(self) -> bool:
        """True once the farm ends or drains: the service thread's work alone."""
        return (
            self._closing
            or self._stopped
            or self._drain_grace is not None
            or (self._drain_at is not None and time.monotonic() >= self._drain_at)
        )

    def _after_inline_round(self, sending: bool) -> None:
        """Poke the service thread if its planned sleep no longer fits."""
        if (
            sending  # sends to progress
            or self._submissions  # another thread's, which poked or will
            or not self._all_ring()  # messages that do not ring must be polled for
            or self._next_dispatch < self._sleep_until  # a timer earlier than its sleep
            or self._snapshot_wanted.is_set()
            or self.scheduler.live_workers() == 0
        ):
            self._wake()

    def _cancel(self, task_id: int) -> None:
        self._submissions.append(("cancel", task_id))
        self._wake()

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event, fields)`` at every state change, in the
        thread that runs the farm's round (the service thread, or a user
        thread taking a short cut on an idle farm).

        Listeners must be quick and must not raise; they see events from the
        moment they are added.
        """
        self._listeners.append(listener)

    def _emit(self, event: str, **fields: Any) -> None:
        fields["t"] = time.time()
        for listener in self._listeners:
            try:
                listener(event, fields)
            except Exception:
                log.exception("taskfarm event listener failed on %s", event)

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
        free (see "Short cuts").  Held through these naps, the round was
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

    def _has_work(self) -> bool:
        """True while any task is neither done nor cancelled (held ones included)."""
        return self._bundler.live > 0 or self.scheduler.has_work()

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

    def _all_ring(self) -> bool:
        """True when every rank has said Hello (which cannot ring) and every
        live one's rings arrive: then any message wakes the service thread
        itself and it need not poll."""
        key = (len(self.transport.wakeup.ringers), self.scheduler.live_workers(), len(self._hosts))
        if self._ringing[:3] != key:
            _, live, hellos = key
            ok = (
                live > 0
                and hellos >= len(self._peers)
                and all(self.transport.rings_from(r) for r in self.scheduler.live_ranks())
            )
            self._ringing = (*key, ok)
        return self._ringing[3]

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
        self._round.release()  # a user thread may run a round meanwhile (see "Short cuts")
        try:
            woken = self.transport.wait(delay)
        finally:
            self._round.acquire()
        self._rung = self._rings_taken = bool(woken & RUNG)
        if woken & POKED and not ringing:
            backoff.restart()  # fresh work: its results are awaited, poll for them

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
            else:
                log.warning("unexpected %s from rank %d", kind.name, peer)
        return got

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
            decision = self.scheduler.finished(
                item.task_id,
                peer,
                now,
                ok=item.ok,
                duration=item.t_end - item.t_start,
                retryable=retryable,
                crashed=item.crashed,
                nbytes=_result_nbytes(self.scheduler, item, (item,)),
            )
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

    def _on_bundle(self, peer: int, item: ResultItem, now: float) -> None:
        """A bundle's outcome: each part resolves its own call (see "Bundles")."""
        failed = sum(1 for part in item.parts if not part.ok) if item.ok else 0
        decision = self.scheduler.finished(
            item.task_id,
            peer,
            now,
            ok=item.ok,
            duration=item.t_end - item.t_start,
            failed_parts=failed,
            nbytes=_result_nbytes(self.scheduler, item, item.parts),
        )
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

    def _fail(self, task_id: int, error: BaseException, *, journaled: bool = True) -> None:
        for sub in self._bundler.bundles.pop(task_id, ()):  # a bundle: each of its calls fails
            self._fail(sub.future.task_id, error, journaled=journaled)
        task = self._tasks.pop(task_id, None)
        if task is not None:
            if not journaled:
                self._outcomes.failed_here(task.future, task.key, error)
            self._outcomes.fail(task.future, error)
        for dependent, failed in self.scheduler.fail_dependents(task_id):
            self._fail(
                dependent,
                DependencyFailed(f"input task {failed} of task {dependent} failed or was cancelled"),
                journaled=False,
            )

    # step 2
    def _commit(self) -> bool:
        """Make the round's outcomes durable (journal), then resolve their
        futures; True if a thread was waiting on one of them."""
        return self._outcomes.commit()

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
        """True for a call with nothing that needs a task of its own (see "Bundles")."""
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

    # -- ending ------------------------------------------------------------
    def _all_peers_gone(self) -> bool:
        return bool(self._peers) and all(self.scheduler.is_lost(p) for p in self._peers)

    def _break(self, error: BrokenFarmError) -> None:
        """No worker can run tasks: fail everything pending, refuse new work."""
        if self._broken is None:
            log.error("%s", error)
        self._broken = error
        for task_id in list(self._tasks):
            self._fail(task_id, BrokenFarmError(str(error)), journaled=False)
        self._bundler.clear()
        while self._submissions:
            sub = self._submissions.popleft()
            if type(sub) is not tuple:
                self._outcomes.fail(sub.future, BrokenFarmError(str(error)))
        self._commit()
        self._closing = True

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
        for peer in targets:
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
