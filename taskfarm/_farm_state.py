"""Rank 0's farm, its bottom layer: the state every step shares.

The farm is built in layers (`taskfarm._master`, its docstring); this one
holds the record (tasks from admission to outcome, ranks, the submission
queue, the locks the short cuts take) and the few moves every step makes:
fail a task, commit the round's outcomes, emit an event, break the farm.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from . import _serialization as ser
from ._bundles import Bundler
from ._errors import BrokenFarmError, DependencyFailed
from ._future import FarmFuture
from ._journal_writer import JournalWriter
from ._outcomes import Listener, Outcomes
from ._pools import PoolSpec
from ._protocol import Bye, Hello, Initializer
from ._resume import ResumeIndex
from ._scheduler import Scheduler
from ._statistics import FarmStatistics
from ._task import TaskPolicy
from ._transport import RING_RECHECKS, Rechecks, Transport, library
from ._trials import Trial

log = logging.getLogger("taskfarm.master")

#: a worker silent this long while holding tasks is declared lost (seconds)
DEFAULT_HEARTBEAT_TIMEOUT = 300.0
#: idle round trips timed each way, rung early and not, before the farm keeps
#: the faster (`taskfarm._trials.Trial`).  On the AMD VM, 5 ranks, the ways
#: differ by 0.08 ms (MPICH) to 0.17 ms (Open MPI) against round trips that
#: vary by ~0.1 ms: with 8 each, one MPICH farm in 3 kept the slower way
#: (Open MPI: none in 3); with 12, none in 3, for 8 more round trips taken
#: the slower way while the farm learns
RING_AHEAD_SAMPLES = 12


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


class FarmState:
    """The farm's record and its shared moves; no step of the round of its own."""

    #: the service thread, which `taskfarm._master.Farm` starts once the record is complete
    _thread: threading.Thread

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
        #: a task's submission from its admission to its outcome
        self._tasks: dict[int, Submission] = {}
        #: after a drain's grace (`_end_drain`), the journal keys of the calls
        #: it cut off while they ran, by task id: a success of theirs that comes
        #: before the Byes is still journaled (`_on_late`), so that a resumed
        #: run does not redo it
        self._cut: dict[int, str] = {}
        #: plain calls waiting to be bundled, and the bundles (`taskfarm._dispatch`, "Bundles");
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
        #: Stop went to the workers (the farm's end): a Bye before it means a rank failed
        self._stop_sent = False
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
        #: held by the thread running a round: the service thread, but while it
        #: sleeps (step 7), or a user thread taking a short cut (`taskfarm._shortcuts`)
        self._round = threading.Lock()
        self._round_owner = 0  # that user thread's ident while it runs a round
        self._sleep_until = 0.0  # monotonic time the service thread's sleep ends
        #: a user thread waiting on the doorbell for the farm's only task: there is one doorbell listener
        self._listening = threading.Lock()
        self._listened: FarmFuture | None = None
        self._inline_cpu = 0.0  # time the rounds user threads ran took (they do not block)
        #: rounds user threads ran in `submit` and in `wait_here` (`taskfarm._shortcuts`)
        self._submit_rounds = 0
        self._result_rounds = 0
        #: whether a lone task's rank is rung early here (see `_ring_ahead`)
        self._ring_trial = Trial(RING_AHEAD_SAMPLES)
        #: (task id, monotonic time of its submit's round, rung early) of the
        #: idle round trip being timed for the trial
        self._timed_trip: tuple[int, float, bool] | None = None
        self._last_result = 0.0  # monotonic time the last result message came
        self._start()

    def _start(self) -> None:
        """Start what runs the farm, its record complete: the top layer's
        business (`taskfarm._master.Farm`, the service thread)."""
        raise NotImplementedError

    def new_task_id(self) -> int:
        return next(self._task_ids)

    def new_executor_id(self) -> int:
        with self._id_lock:
            self._next_executor_id += 1
            return self._next_executor_id

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    def _cancel(self, task_id: int) -> None:
        self._submissions.append(("cancel", task_id))
        self._wake()

    def _emit(self, event: str, **fields: Any) -> None:
        fields["t"] = time.time()
        for listener in self._listeners:
            try:
                listener(event, fields)
            except Exception:
                log.exception("taskfarm event listener failed on %s", event)

    # step 2
    def _commit(self) -> bool:
        """Make the round's outcomes durable (journal), then resolve their
        futures; True if a thread was waiting on one of them."""
        return self._outcomes.commit()

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

    def _has_work(self) -> bool:
        """True while any task is neither done nor cancelled (held ones included)."""
        return self._bundler.live > 0 or self.scheduler.has_work()

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

    def _service_only(self) -> bool:
        """True once the farm ends or drains: the service thread's work alone."""
        return (
            self._closing
            or self._stopped
            or self._drain_grace is not None
            or (self._drain_at is not None and time.monotonic() >= self._drain_at)
        )

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
