"""Which task runs where and when: a pure state machine.

Events come in as method calls (`submit`, `finished`, `released`,
`heard_from`, `rank_lost`, ...); `poll(now)` returns the actions the master
must carry out (dispatch, steal, expire, fail dependents, declare ranks
lost).  Nothing here does I/O or reads a clock: time is passed in as
monotonic seconds, so unit tests drive every timing rule with a fake clock.

Rules, in the order `poll` applies them:

1. Timed tasks (countdown, ETA, retry backoff) whose time has come become ready.
2. A rank that holds tasks and has been silent for ``heartbeat_timeout`` is
   lost; its tasks go back to the ready queue (the running one counts a crash).
3. Ready tasks, highest priority first then oldest, go to the least-loaded
   rank with a free slot; a retried task avoids the rank it failed on when
   another is free.  Each rank holds up to ``slots * (1 + prefetch)`` tasks
   (a bundle counts its calls), where prefetch grows as tasks get shorter, so
   tiny tasks never leave a worker waiting for the master.  A task with an
   expiry goes only to a free slot, never into a queue behind a running task,
   where it could start too late.
4. When nothing is ready and a rank sits idle, tasks queued (not started)
   behind a busy rank's running task are stolen back, so the tail of a skewed
   workload never waits behind one long task: the newest of them, an even
   share of the queue's weight for each idle rank.
5. When nothing is ready, nothing is left to steal and ranks still sit idle,
   running tasks whose policy is ``speculative`` (idempotent) and that have
   run for `SPECULATE_FACTOR` times the mean task duration get a copy on an
   idle rank, the slowest first: a straggling node does not hold up the end.

A result is accepted once: the first success of a task wins; later copies
(a rank declared lost that wakes up, a speculative duplicate) are discarded
and counted.  When a speculative task's first success comes, its other copy
is revoked (`take_revokes`): cut off where it runs, so that its rank takes
other work and the farm's end does not wait for it.

An entry may stand for several of the user's tasks (a bundle of calls, see
`taskfarm._master`): it has a ``weight``, and every count is in user tasks.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import math
import random
from collections.abc import Iterable

from ._task import TaskPolicy, TaskState

#: seconds of queued work each worker slot should hold so it never waits for
#: the master: several master round trips under load on a busy node.  Deep
#: enough that results and refills travel in batches: every message wakes a
#: thread on each side, and on an oversubscribed node each wake-up also
#: preempts a task.  1 ms tasks, 2 workers on 2 cores (with the worker's
#: `RESULT_LINGER` at half of it): 20 ms -> 80 ms gave efficiency 0.90 -> 0.93
#: with submit, 0.93 -> 0.96 with map, skewed makespan 1.09 -> 1.06; with
#: bundles, 80 -> 320 ms gave 0.909-0.921 -> 0.940-0.948 with submit,
#: 0.959-0.969 -> 0.976-0.981 with map, skewed 1.07-1.08 -> 1.05-1.07 (3
#: pairs; docs/performance.md).  Stealing takes queued tasks back from behind
#: a long one, so the depth costs no balance; `PREFETCH_BYTES` bounds the
#: memory it holds.
PIPELINE_SECONDS = 0.32
#: upper bound on prefetched tasks per slot (bounds what a lost rank takes down):
#: the pipeline's worth of 1 ms tasks
MAX_PREFETCH = 320
#: bytes of arguments (inputs from other tasks included) a rank may hold
#: beyond what fills its idle slots: tasks of large arrays are prefetched only
#: while the rank holds less than this, so the pipeline's depth in seconds
#: never becomes gigabytes queued on one rank (16 MB echoes still go four deep)
PREFETCH_BYTES = 64 << 20
#: weight of the newest task duration in the running mean
DURATION_EWMA = 0.05


#: a running speculative task straggles once it has run this many times the
#: mean task duration (and at least `SPECULATE_MIN_SECONDS`)
SPECULATE_FACTOR = 3.0
#: no copy of a task that has run for less than this (seconds): tiny tasks
#: would finish before a copy could start
SPECULATE_MIN_SECONDS = 0.01

#: tasks with an expiry passed over in one poll while waiting for an idle slot,
#: at most (bounds the cost of a poll; the rest wait as if every rank were full)
MAX_DEFERRED = 64

#: states a dispatched task is in after being put back in the queue
_REQUEUED = (TaskState.PENDING, TaskState.SCHEDULED, TaskState.RETRY)


def _without(holders: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """``holders`` less ``rank``."""
    if rank not in holders:
        return holders
    if len(holders) == 1:  # the usual case
        return ()
    return tuple(h for h in holders if h != rank)


def _refillable(info: _Rank, free: int) -> bool:
    """A rank is sent more once half its pipeline is free, or when a slot is
    idle: tasks go in batches (one message for many tiny tasks) while it runs
    the rest."""
    return free >= max(1, info.capacity // 2) or len(info.inflight) < info.slots


def _free_of(info: _Rank) -> int:
    """The user's tasks ``info`` may be sent: its free capacity, or only its
    idle slots while it holds `PREFETCH_BYTES` of arguments or more."""
    free = info.capacity - info.load
    if info.nbytes >= PREFETCH_BYTES:
        free = min(free, info.slots - len(info.inflight))
    return max(0, free)


class Decision(enum.Enum):
    """What the master does with a result or failure that arrived."""

    ACCEPT = "accept"  # first success: resolve the future
    RETRY = "retry"  # failure, retried later
    FAIL = "fail"  # failure, not retryable: the future gets the error
    EXHAUSTED = "exhausted"  # failure, retries used up: MaxRetriesExceededError
    QUARANTINE = "quarantine"  # killed max_crashes workers: WorkerLostError
    DISCARD = "discard"  # duplicate or stale: already decided, drop it


@dataclasses.dataclass(slots=True)
class _Entry:
    task_id: int
    seq: int
    priority: int
    policy: TaskPolicy
    not_before: float
    expires: float | None
    deps_left: int
    state: TaskState
    attempt: int = 0  # attempts dispatched so far
    failures: int = 0  # failures that count against max_retries
    crashes: int = 0
    avoid_rank: int | None = None
    dispatched: float = 0.0  # when its latest copy went out (monotonic)
    #: ranks holding it (one; two with a speculative copy; none while queued here):
    #: a tuple, not a set, for a tuple of ints leaves the garbage collector's care
    holders: tuple[int, ...] = ()
    #: tasks waiting for this one; an empty tuple until the first (most have none,
    #: and a list per task is one more object for the garbage collector)
    dependents: list[int] | tuple[()] = ()
    inputs: tuple[int, ...] = ()
    #: the user's tasks this entry stands for (a bundle's parts; 1 for a task)
    weight: int = 1
    #: bytes of its arguments on the wire (see `PREFETCH_BYTES`)
    nbytes: int = 0
    #: of those, the ones that failed inside a bundle that ran (set on its result)
    failed_parts: int = 0


@dataclasses.dataclass
class _Rank:
    rank: int
    slots: int
    #: task ids in dispatch order, to their weight; the first ``slots`` are
    #: running, the rest queued
    inflight: dict[int, int] = dataclasses.field(default_factory=dict)
    #: the weights of ``inflight`` summed: the user's tasks the rank holds
    load: int = 0
    #: argument bytes of the tasks in ``inflight`` that have any, and their sum
    sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    nbytes: int = 0
    alive: bool = True
    last_heard: float = 0.0
    stealing: set[int] = dataclasses.field(default_factory=set)
    #: how many idle ranks the tasks in ``stealing`` are meant for
    steal_serves: int = 0
    done: int = 0
    failed: int = 0
    busy_time: float = 0.0
    #: when the rank last reported a task finished: the next queued one started then
    last_finish: float = 0.0
    #: tasks it may hold: slots x (1 + prefetch), kept by `Scheduler._set_capacity`
    capacity: int = 0
    #: the index of the free-capacity bucket it sits in (`Scheduler._free`)
    bucket: int = 0


@dataclasses.dataclass(frozen=True)
class RankStats:
    """Per-rank figures as the scheduler sees them."""

    slots: int
    tasks: int
    failed: int
    busy_time: float
    alive: bool


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """Counts of the scheduler, a snapshot."""

    submitted: int
    done: int
    failed: int
    cancelled: int
    retried: int
    resubmitted: int
    stolen: int
    zombies: int
    duplicates: int
    #: copies of straggling speculative tasks started (their losers count in ``duplicates``)
    speculated: int
    pending: int
    running: int
    lost_ranks: tuple[int, ...]
    ranks: dict[int, RankStats]


@dataclasses.dataclass
class Actions:
    """What `poll` asks the master to do now."""

    dispatch: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    #: ranks in ``dispatch`` that had nothing queued behind their running tasks:
    #: the first task sent there is the next they start
    starting: set[int] = dataclasses.field(default_factory=set)
    steal: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    expired: list[int] = dataclasses.field(default_factory=list)
    lost_ranks: list[int] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dispatch or self.steal or self.expired or self.lost_ranks)


class Scheduler:
    """Queues, priorities, dependencies, prefetch, retries, stealing, rank loss."""

    def __init__(
        self,
        *,
        heartbeat_timeout: float | None = None,
        max_workers: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.max_workers = max_workers
        self._rng = rng or random.Random()
        self._entries: dict[int, _Entry] = {}
        self._ready: list[tuple[int, int, int]] = []  # (-priority, seq, task_id)
        self._timed: list[tuple[float, int, int]] = []  # (not_before, seq, task_id)
        self._ranks: dict[int, _Rank] = {}
        #: alive ranks by free capacity (index 0: full); the dispatcher takes the freest
        self._free: list[dict[int, None]] = [{}]
        #: no bucket above this one holds a rank (so a pick need not walk
        #: the empty ones: with MAX_PREFETCH 64 there are 66 buckets)
        self._top = 0
        #: dependents of tasks that failed or were cancelled, for `fail_dependents`
        self._orphans: dict[int, list[int]] = {}
        self._seq = 0
        self._mean_duration: float | None = None
        self._prefetch = 1
        # counters
        self._submitted = self._done = self._failed = self._cancelled = 0
        self._retried = self._resubmitted = self._stolen = 0
        self._zombies = self._duplicates = self._speculated = 0
        self._speculative = False  # a speculative task was ever submitted (rule 5 applies)
        #: copies to revoke, by rank: the other copy of a speculative task that won
        self._revokes: dict[int, list[int]] = {}
        #: (rank, task id) of the copies revoked and not yet answered: their
        #: answer is dropped uncounted (the copy counted as a duplicate when revoked)
        self._revoked: set[tuple[int, int]] = set()
        self._lost: list[int] = []
        #: ranks alive: asked several times per service round, counted here
        #: rather than over every rank each time
        self._live = 0
        #: ranks holding more tasks than slots (a queue behind the running
        #: ones): what rule 4 may steal from, kept here so that a poll with
        #: nothing to steal does not walk every rank to find that out
        self._queued: set[int] = set()
        #: live ranks holding no task, and live ranks asked to give tasks
        #: back (a steal under way), for rules 4 and 5 likewise
        self._idle: set[int] = set()
        self._stealing: set[int] = set()
        #: no rank holding tasks can have been silent for `heartbeat_timeout`
        #: before this time (a lower bound: a heartbeat only moves a rank's
        #: clock on), so rule 2 walks every rank only once it has come
        self._heartbeat_due = -math.inf

    # -- workers -----------------------------------------------------------
    def add_worker(self, rank: int, slots: int, now: float) -> bool:
        """Register a worker rank with ``slots`` task slots; False if over max_workers."""
        if self.max_workers is not None and self.live_workers() >= self.max_workers:
            return False
        info = _Rank(rank, max(1, slots), last_heard=now)
        old = self._ranks.get(rank)
        if old is not None and old.alive:
            self._free[old.bucket].pop(rank, None)
            self._live -= 1
        self._ranks[rank] = info
        self._live += 1
        self._queued.discard(rank)
        self._stealing.discard(rank)
        self._idle.add(rank)
        self._set_capacity(info)
        self._place(info)
        return True

    def live_workers(self) -> int:
        return self._live

    def live_ranks(self) -> list[int]:
        return [r.rank for r in self._ranks.values() if r.alive]

    def heard_from(self, rank: int, now: float) -> None:
        info = self._ranks.get(rank)
        if info is not None:
            info.last_heard = now

    def is_lost(self, rank: int) -> bool:
        info = self._ranks.get(rank)
        return info is not None and not info.alive

    def rank_lost(self, rank: int, now: float) -> list[int]:
        """Declare ``rank`` dead; its tasks go back to the queue. Returns their ids."""
        info = self._ranks.get(rank)
        if info is None or not info.alive:
            return []
        self._free[info.bucket].pop(rank, None)
        info.alive = False
        self._live -= 1
        self._lost.append(rank)
        requeued = []
        for position, task_id in enumerate(info.inflight):
            entry = self._entries.get(task_id)
            if entry is None:
                continue
            entry.holders = _without(entry.holders, rank)
            if entry.holders:  # a speculative copy still runs elsewhere
                continue
            if position < info.slots:
                entry.crashes += 1  # it was running: it may be what killed the rank
            entry.avoid_rank = rank
            if entry.crashes >= entry.policy.max_crashes:
                # leave it RUNNING with no holder; the master fails it via `quarantined`
                requeued.append(task_id)
                continue
            self._resubmitted += entry.weight
            self._make_ready(entry, now)
            requeued.append(task_id)
        info.inflight.clear()
        self._queued.discard(rank)
        self._idle.discard(rank)
        info.load = 0
        info.sizes.clear()
        info.nbytes = 0
        info.stealing.clear()
        self._stealing.discard(rank)
        return requeued

    def quarantined(self, task_ids: Iterable[int]) -> list[int]:
        """Of ``task_ids`` (from `rank_lost`), those that reached max_crashes; they fail now."""
        out = []
        for task_id in task_ids:
            entry = self._entries.get(task_id)
            if (
                entry is not None
                and entry.state is TaskState.RUNNING
                and not entry.holders
                and entry.crashes >= entry.policy.max_crashes
            ):
                self._finish(entry, TaskState.FAILURE)
                out.append(task_id)
        return out

    # -- tasks -------------------------------------------------------------
    def submit(
        self,
        task_id: int,
        now: float,
        *,
        policy: TaskPolicy,
        priority: int = 0,
        not_before: float | None = None,
        expires: float | None = None,
        inputs: Iterable[int] = (),
        weight: int = 1,
        nbytes: int = 0,
    ) -> bool:
        """Add a task; True if it is ready to run now (no wait for inputs or time).

        ``inputs`` are ids of unfinished tasks it depends on; inputs already
        finished are the master's business (it passes their values or fails
        the task at once).  ``weight``: the user's tasks it stands for (a
        bundle); ``nbytes``: its arguments' size, which bounds prefetching."""
        self._seq += 1
        self._submitted += weight
        self._speculative = self._speculative or policy.speculative
        entry = _Entry(
            task_id,
            self._seq,
            priority,
            policy,
            not_before if not_before is not None else now,
            expires,
            0,
            TaskState.PENDING,
            weight=weight,
            nbytes=nbytes,
        )
        self._entries[task_id] = entry
        waiting = []
        for dep in inputs:
            dep_entry = self._entries.get(dep)
            if dep_entry is None:
                continue  # finished already: the master passes its value
            if isinstance(dep_entry.dependents, list):
                dep_entry.dependents.append(task_id)
            else:
                dep_entry.dependents = [task_id]
            waiting.append(dep)
        entry.inputs = tuple(waiting)
        entry.deps_left = len(waiting)
        if entry.deps_left == 0:
            self._make_ready(entry, now)
            return entry.state is TaskState.PENDING
        entry.state = TaskState.SCHEDULED
        return False

    def cancel(self, task_id: int) -> bool:
        """Cancel a task not yet dispatched; False if it runs or is done."""
        entry = self._entries.get(task_id)
        if entry is None or entry.state not in (
            TaskState.PENDING,
            TaskState.SCHEDULED,
            TaskState.RETRY,
        ):
            return False
        self._finish(entry, TaskState.CANCELLED)
        return True

    def withdraw(self, task_id: int, rank: int) -> None:
        """Undo the dispatch of a task the user cancelled in that instant."""
        info = self._ranks.get(rank)
        if info is not None and task_id in info.inflight:
            self._unhold(info, task_id)
        entry = self._entries.get(task_id)
        if entry is not None:
            entry.holders = _without(entry.holders, rank)
            self._finish(entry, TaskState.CANCELLED)

    def drop_parts(self, task_id: int, cancelled: int) -> None:
        """``cancelled`` of a bundle's parts were cancelled before it went out."""
        entry = self._entries.get(task_id)
        if entry is not None:
            entry.weight -= cancelled
            self._cancelled += cancelled

    def parts_failed(self, task_id: int, failed: int) -> None:
        """``failed`` calls of a running bundle came back failed before it
        ended (`Kind.PARTS`): counted as failed when it succeeds, with the
        failed calls of its own result."""
        entry = self._entries.get(task_id)
        if entry is not None:
            entry.failed_parts += failed

    def cancelled_outside(self) -> None:
        """Count a task cancelled before the master handed it over (before
        its admission, or while it waited to be bundled): submitted and cancelled."""
        self._submitted += 1
        self._cancelled += 1

    def dissolve(self, task_id: int) -> int:
        """Remove a bundle put back in the queue (its rank was lost, or it was
        stolen) whose calls the master submits again, one by one or in new
        bundles; returns its weight (0 if gone).

        Only for an entry nothing depends on: its dependents would wait forever.
        """
        entry = self._entries.get(task_id)
        if entry is None or entry.dependents or entry.holders or entry.state is TaskState.SUCCESS:
            return 0
        del self._entries[task_id]  # its queue and timer items go stale and are skipped
        self._submitted -= entry.weight  # its calls are submitted again
        return entry.weight

    def rooms(self) -> list[int]:
        """The user's tasks each live rank would be sent now (its free capacity,
        once half its pipeline is free or it is idle: see `_pick_rank`), freest first."""
        out = []
        for r in self._ranks.values():
            free = _free_of(r)
            if r.alive and free > 0 and _refillable(r, free):
                out.append(free)
        return sorted(out, reverse=True)

    def ready_weight(self, limit: int | None = None) -> int:
        """The user's tasks in the ready queue (bundles count their calls);
        counting stops once ``limit`` is reached (the queue may be long)."""
        entries = self._entries
        total = 0
        for _, _, task_id in self._ready:
            entry = entries.get(task_id)
            if entry is not None:
                total += entry.weight
                if limit is not None and total >= limit:
                    break
        return total

    def live_slots(self) -> int:
        return sum(r.slots for r in self._ranks.values() if r.alive)

    def shallow_rooms(self, depth: int) -> int:
        """Tasks the live ranks could take if each slot held at most ``depth``
        (its running task and those queued behind it)."""
        return sum(max(0, r.slots * depth - len(r.inflight)) for r in self._ranks.values() if r.alive)

    def state(self, task_id: int) -> TaskState | None:
        entry = self._entries.get(task_id)
        return None if entry is None else entry.state

    def awaited(self, task_id: int) -> bool:
        """True when other tasks wait for this one's result."""
        entry = self._entries.get(task_id)
        return entry is not None and bool(entry.dependents)

    def attempt(self, task_id: int) -> int:
        entry = self._entries.get(task_id)
        return 0 if entry is None else entry.attempt

    def failures(self, task_id: int) -> int:
        entry = self._entries.get(task_id)
        return 0 if entry is None else entry.failures

    def finished(
        self,
        task_id: int,
        rank: int,
        now: float,
        *,
        ok: bool,
        duration: float = 0.0,
        retryable: bool = False,
        crashed: bool = False,
        counts: bool = True,
        failed_parts: int = 0,
        nbytes: int = 0,
    ) -> Decision:
        """A result or failure of ``task_id`` arrived from ``rank``.

        ``retryable``: the task's policy allows retrying this error.
        ``crashed``: the process running it died (counts towards max_crashes,
        not max_retries).  ``counts=False``: an attempt cut off by the farm
        itself (draining), which does not use up a retry.  ``failed_parts``:
        of a bundle that ran (``ok``), the calls that failed; they count as failed.
        ``nbytes``: the size of its result, which each task that takes it as
        an input carries to its rank (it counts against `PREFETCH_BYTES`).
        """
        info = self._ranks.get(rank)
        held = False
        if info is not None and task_id in info.inflight:
            held = True
            self._unhold(info, task_id)
            info.busy_time += duration
            info.last_finish = now
        entry = self._entries.get(task_id)
        if entry is not None:
            entry.holders = _without(entry.holders, rank)
        if self._revoked and (rank, task_id) in self._revoked:
            self._revoked.discard((rank, task_id))
            return Decision.DISCARD  # the answer of a revoked copy: counted when revoked
        zombie = info is not None and not info.alive
        if zombie:
            self._zombies += 1
        if entry is None:
            if ok:
                self._duplicates += 1  # its weight is gone with it: counted as one
            return Decision.DISCARD
        # a rank declared lost that finished a requeued task after all: the first success wins
        late_success = ok and zombie and entry.attempt > 0 and entry.state in _REQUEUED
        if entry.state is not TaskState.RUNNING and not late_success:
            if ok:
                self._duplicates += entry.weight
            return Decision.DISCARD
        if not held and info is not None and info.alive:
            # not ours any more (stolen back and re-dispatched): the live copy decides
            if ok:
                self._duplicates += entry.weight
            return Decision.DISCARD
        if ok:
            self._observe(duration / max(1, entry.weight), entry.weight)  # per call: capacity counts calls
            entry.failed_parts += failed_parts  # and those that came before it ended (`parts_failed`)
            if info is not None:
                info.done += entry.weight - entry.failed_parts
                info.failed += entry.failed_parts
            for other in entry.holders:  # a speculative copy still runs there: it lost
                self._revokes.setdefault(other, []).append(task_id)
                self._revoked.add((other, task_id))
                self._duplicates += entry.weight
            self._finish(entry, TaskState.SUCCESS, nbytes)
            return Decision.ACCEPT
        if entry.holders:
            return Decision.DISCARD  # a speculative copy is still running
        if info is not None:
            info.failed += 1
        entry.avoid_rank = rank
        if crashed:
            entry.crashes += 1
            if entry.crashes >= entry.policy.max_crashes:
                self._finish(entry, TaskState.FAILURE)
                return Decision.QUARANTINE
            self._resubmitted += entry.weight
            self._make_ready(entry, now)
            return Decision.RETRY
        if not counts:
            self._resubmitted += entry.weight
            self._make_ready(entry, now)
            return Decision.RETRY
        if not retryable:
            self._finish(entry, TaskState.FAILURE)
            return Decision.FAIL
        entry.failures += 1
        if entry.failures > entry.policy.max_retries:
            self._finish(entry, TaskState.FAILURE)
            return Decision.EXHAUSTED if entry.policy.max_retries > 0 else Decision.FAIL
        self._retried += 1
        entry.state = TaskState.RETRY
        entry.not_before = now + self._backoff(entry.policy, entry.failures)
        self._push_timed(entry)
        return Decision.RETRY

    def take_revokes(self) -> dict[int, list[int]]:
        """The copies to revoke now, by rank (and forget them): each is the
        other copy of a speculative task whose first success came."""
        revokes, self._revokes = self._revokes, {}
        return revokes

    @property
    def revoking(self) -> bool:
        """True when `take_revokes` has copies to hand out."""
        return bool(self._revokes)

    def released(self, rank: int, task_ids: Iterable[int], now: float) -> None:
        """A worker gave back queued tasks it had not started (after a steal or a revoke)."""
        info = self._ranks.get(rank)
        for task_id in task_ids:
            self._revoked.discard((rank, task_id))  # a revoked copy that had not started
            if info is not None:
                info.stealing.discard(task_id)
                if not info.stealing:
                    self._stealing.discard(rank)
                if task_id not in info.inflight:
                    continue
                self._unhold(info, task_id)
            entry = self._entries.get(task_id)
            if entry is None or entry.state is not TaskState.RUNNING:
                continue
            entry.holders = _without(entry.holders, rank)
            if not entry.holders:
                entry.attempt -= 1  # it never started
                self._stolen += entry.weight
                self._make_ready(entry, now)

    def fail_dependents(self, task_id: int) -> list[tuple[int, int]]:
        """Dependents (transitively) of a failed/cancelled task: (dependent, failed input)."""
        out: list[tuple[int, int]] = []
        stack = [task_id]
        while stack:
            failed = stack.pop()
            for dep in self._pop_dependents(failed):
                entry = self._entries.get(dep)
                if entry is None or entry.state is not TaskState.SCHEDULED:
                    continue
                self._finish(entry, TaskState.FAILURE)
                out.append((dep, failed))
                stack.append(dep)
        return out

    def _pop_dependents(self, task_id: int) -> list[int]:
        return self._orphans.pop(task_id, [])

    # -- the clock ---------------------------------------------------------
    def poll(self, now: float) -> Actions:
        """Everything that is due at ``now``; see the module docstring for the order."""
        actions = Actions()
        self._release_timed(now)
        if self.heartbeat_timeout is not None and now >= self._heartbeat_due:
            self._check_heartbeats(now, actions)
        self._assign(now, actions)
        if not self._ready:
            self._plan_steals(actions)
            if not actions.steal:
                self._speculate(now, actions)
        return actions

    def _check_heartbeats(self, now: float, actions: Actions) -> None:
        """Rule 2 over every rank; then the next time it can find anything."""
        assert self.heartbeat_timeout is not None
        due = math.inf
        for info in list(self._ranks.values()):
            if not info.alive or not info.inflight:
                continue
            deadline = info.last_heard + self.heartbeat_timeout
            if now > deadline:
                actions.lost_ranks.append(info.rank)  # and again each poll until `rank_lost`
            due = min(due, deadline)
        self._heartbeat_due = due

    def next_wakeup(self) -> float | None:
        """The earliest time at which `poll` may have something new to do."""
        times = []
        while self._timed and self._stale_timed(self._timed[0]):
            heapq.heappop(self._timed)
        if self._timed:
            times.append(self._timed[0][0])
        if self.heartbeat_timeout is not None and self._heartbeat_due < math.inf:
            times.append(self._heartbeat_due)  # at worst early: that poll finds the true one
        straggling = self._straggling()
        if straggling:
            times.append(min(since for since, _ in straggling) + self._straggler_threshold())
        return min(times) if times else None

    def has_work(self) -> bool:
        """True while any task is neither done nor cancelled."""
        return bool(self._entries)

    def has_ready(self) -> bool:
        return bool(self._ready)

    def in_flight(self) -> int:
        """Tasks held by live ranks (running or queued there)."""
        return sum(len(r.inflight) for r in self._ranks.values() if r.alive)

    def statistics(self) -> SchedulerStats:
        running = sum(e.weight for e in self._entries.values() if e.state is TaskState.RUNNING)
        pending = sum(e.weight for e in self._entries.values()) - running
        return SchedulerStats(
            submitted=self._submitted,
            done=self._done,
            failed=self._failed,
            cancelled=self._cancelled,
            retried=self._retried,
            resubmitted=self._resubmitted,
            stolen=self._stolen,
            zombies=self._zombies,
            duplicates=self._duplicates,
            speculated=self._speculated,
            pending=pending,
            running=running,
            lost_ranks=tuple(self._lost),
            ranks={
                r.rank: RankStats(r.slots, r.done, r.failed, r.busy_time, r.alive)
                for r in self._ranks.values()
            },
        )

    @property
    def prefetch(self) -> int:
        return self._prefetch

    # -- internals ---------------------------------------------------------
    def _finish(self, entry: _Entry, state: TaskState, result_nbytes: int = 0) -> None:
        entry.state = state
        del self._entries[entry.task_id]
        if state is TaskState.SUCCESS:
            self._done += entry.weight - entry.failed_parts
            self._failed += entry.failed_parts
            for dep in entry.dependents:
                child = self._entries.get(dep)
                if child is not None and child.state is TaskState.SCHEDULED:
                    child.nbytes += result_nbytes  # its input travels with it
                    child.deps_left -= 1
                    if child.deps_left == 0:
                        # `poll` releases it once its own not_before has come
                        self._push_timed(child)
        else:
            if state is TaskState.FAILURE:
                self._failed += entry.weight
            else:
                self._cancelled += entry.weight
            if entry.dependents:
                self._orphans[entry.task_id] = list(entry.dependents)

    def _make_ready(self, entry: _Entry, now: float) -> None:
        if entry.not_before > now:
            entry.state = TaskState.SCHEDULED
            self._push_timed(entry)
            return
        entry.state = TaskState.PENDING
        heapq.heappush(self._ready, (-entry.priority, entry.seq, entry.task_id))

    def _push_timed(self, entry: _Entry) -> None:
        heapq.heappush(self._timed, (entry.not_before, entry.seq, entry.task_id))

    def _stale_timed(self, item: tuple[float, int, int]) -> bool:
        entry = self._entries.get(item[2])
        return entry is None or entry.not_before != item[0] or entry.state not in (
            TaskState.SCHEDULED,
            TaskState.RETRY,
        )

    def _release_timed(self, now: float) -> None:
        while self._timed and self._timed[0][0] <= now:
            item = heapq.heappop(self._timed)
            if self._stale_timed(item):
                continue
            entry = self._entries[item[2]]
            if entry.deps_left == 0:
                entry.state = TaskState.PENDING
                heapq.heappush(self._ready, (-entry.priority, entry.seq, entry.task_id))

    def _set_capacity(self, info: _Rank) -> None:
        info.capacity = info.slots * (1 + self._prefetch)

    def _place(self, info: _Rank) -> None:
        """Put ``info`` in the bucket of its free capacity (it is in none)."""
        free = _free_of(info)
        buckets = self._free
        while len(buckets) <= free:
            buckets.append({})
        buckets[free][info.rank] = None
        info.bucket = free
        if free > self._top:
            self._top = free

    def _pick_rank(
        self, avoid: int | None, filling: dict[int, list[int]], skip: list[int]
    ) -> _Rank | None:
        """The rank with the most free capacity, not ``avoid`` if another is free.

        A rank is refilled only once half its pipeline is free, so tasks go
        out in batches (one message for many tiny tasks) while it still has
        the other half queued; a refill started in this poll (``filling``)
        goes on up to full capacity.  Ranks in ``skip`` get nothing.
        """
        fallback = None
        buckets = self._free
        top = self._top
        while top > 0 and not buckets[top]:
            top -= 1
        self._top = top
        for free in range(top, 0, -1):
            for rank in buckets[free]:
                info = self._ranks[rank]
                if not _refillable(info, free) and rank not in filling:
                    continue
                if rank in skip:
                    continue
                if rank != avoid:
                    return info
                fallback = info
        return fallback

    def _assign(self, now: float, actions: Actions) -> None:
        deferred: list[tuple[int, int, int]] = []  # tasks with an expiry waiting for an idle slot
        self._assign_ready(now, actions, deferred)
        for item in deferred:
            heapq.heappush(self._ready, item)

    def _assign_ready(self, now: float, actions: Actions, deferred: list[tuple[int, int, int]]) -> None:
        while self._ready:
            _, _, task_id = self._ready[0]
            entry = self._entries.get(task_id)
            if entry is None or entry.state is not TaskState.PENDING:
                heapq.heappop(self._ready)
                continue
            if entry.expires is not None and now > entry.expires:
                heapq.heappop(self._ready)
                self._finish(entry, TaskState.FAILURE)
                actions.expired.append(task_id)
                continue
            if entry.expires is not None:
                # never queued behind a running task, where it could start after its expiry
                info = self._pick_idle(entry.avoid_rank, actions.lost_ranks)
                if info is None:
                    full = self._pick_rank(None, actions.dispatch, actions.lost_ranks) is None
                    if full or len(deferred) >= MAX_DEFERRED:
                        break
                    deferred.append(heapq.heappop(self._ready))
                    continue
            else:
                info = self._pick_rank(entry.avoid_rank, actions.dispatch, actions.lost_ranks)
            if info is None:
                break
            heapq.heappop(self._ready)
            if not info.inflight:
                info.last_heard = now  # the heartbeat clock starts with its first task
            if len(info.inflight) <= info.slots and info.rank not in actions.dispatch:
                actions.starting.add(info.rank)
            self._hold(info, task_id)
            if info.rank not in entry.holders:
                entry.holders += (info.rank,)
            entry.state = TaskState.RUNNING
            entry.attempt += 1
            entry.dispatched = now
            actions.dispatch.setdefault(info.rank, []).append(task_id)

    def has_idle_rank(self) -> bool:
        """True while a live rank holds no task: one sent now starts at once there."""
        return bool(self._idle)

    def next_rank(self) -> int | None:
        """The rank the next plain task would go to now (None: none has room)."""
        info = self._pick_rank(None, {}, [])
        return None if info is None else info.rank

    def _pick_idle(self, avoid: int | None, skip: list[int]) -> _Rank | None:
        """A rank with a free slot (a task sent there starts at once), not ``avoid`` if another."""
        fallback = None
        for info in self._ranks.values():
            if not info.alive or len(info.inflight) >= info.slots or info.rank in skip:
                continue
            if info.rank != avoid:
                return info
            fallback = info
        return fallback

    def _plan_steals(self, actions: Actions) -> None:
        # nothing queued behind a running task anywhere, or no rank idle:
        # nothing to steal, known from the counters without walking the ranks
        # (the plan below sorts every rank; after each lone task on an idle
        # farm of 2,048 ranks, the walks alone took ~1.6 ms, benchmarks/scheduler.py)
        if not self._queued:
            return
        idle = len(self._idle)  # a rank dispatched to in this poll holds its task already
        if idle <= 0:
            return
        # a steal still under way already serves idle ranks: do not take more for them
        idle -= sum(self._ranks[rank].steal_serves for rank in self._stealing)
        if idle <= 0:
            return
        # the most queued work first (only ranks with a queue can give any)
        for info in sorted((self._ranks[rank] for rank in self._queued), key=lambda r: (-r.load, r.rank)):
            if idle <= 0:
                return
            if info.rank in actions.lost_ranks:
                continue  # all its tasks go back to the queue anyway
            queued = [t for t in list(info.inflight)[info.slots :] if t not in info.stealing]
            if not queued:
                continue
            # the idle ranks' even share of the queue's weight, rounded up (the
            # rank also has its running tasks to finish), the newest first: one
            # task at a time left a thief idle for a round trip after each one
            # at the tail of a burst
            share = sum(info.inflight[t] for t in queued) * idle / (idle + 1)
            take: list[int] = []
            taken = 0
            while queued and taken < share:
                task_id = queued.pop()
                take.append(task_id)
                taken += info.inflight[task_id]
            take.reverse()
            serves = min(idle, len(take))
            info.steal_serves = (info.steal_serves if info.stealing else 0) + serves
            info.stealing.update(take)
            self._stealing.add(info.rank)
            actions.steal[info.rank] = take
            idle -= serves

    def _straggler_threshold(self) -> float:
        return max(SPECULATE_MIN_SECONDS, SPECULATE_FACTOR * (self._mean_duration or 0.0))

    def _straggling(self, busy: set[int] | frozenset[int] = frozenset()) -> list[tuple[float, int]]:
        """Candidates for rule 5 while a rank sits idle: (running since, task id)
        of running speculative tasks with one copy, on ranks not in ``busy``."""
        if not self._speculative or self._mean_duration is None:
            return []
        if not any(r.alive and not r.inflight and r.rank not in busy for r in self._ranks.values()):
            return []
        out = []
        for info in self._ranks.values():
            if not info.alive or info.rank in busy:
                continue
            for task_id in list(info.inflight)[: info.slots]:  # the running ones
                entry = self._entries.get(task_id)
                if entry is not None and entry.policy.speculative and len(entry.holders) == 1:
                    out.append((max(entry.dispatched, info.last_finish), task_id))  # running at least since
        return out

    def _speculate(self, now: float, actions: Actions) -> None:
        """Rule 5: copies of straggling speculative tasks on idle ranks, the slowest first."""
        if not self._speculative:
            return  # no task ever asked for it: no rank needs scanning
        if self._stealing:
            return  # a steal under way serves the idle ranks first
        busy = set(actions.dispatch) | set(actions.lost_ranks)
        threshold = self._straggler_threshold()
        stragglers = sorted((since, task_id) for since, task_id in self._straggling(busy) if now - since > threshold)
        idle = [r for r in self._ranks.values() if r.alive and not r.inflight and r.rank not in busy]
        for (_, task_id), target in zip(stragglers, idle):
            self._hold(target, task_id)
            target.last_heard = now  # its heartbeat clock starts with this task
            entry = self._entries[task_id]
            entry.holders += (target.rank,)
            self._speculated += 1
            actions.dispatch.setdefault(target.rank, []).append(task_id)

    def _hold(self, info: _Rank, task_id: int) -> None:
        self._free[info.bucket].pop(info.rank, None)
        entry = self._entries[task_id]
        weight = entry.weight
        info.inflight[task_id] = weight
        info.load += weight
        if entry.nbytes:
            info.sizes[task_id] = entry.nbytes
            info.nbytes += entry.nbytes
        self._idle.discard(info.rank)
        if len(info.inflight) > info.slots:
            self._queued.add(info.rank)
        if self.heartbeat_timeout is not None:
            due = info.last_heard + self.heartbeat_timeout
            if due < self._heartbeat_due:
                self._heartbeat_due = due
        self._place(info)

    def _unhold(self, info: _Rank, task_id: int) -> None:
        if info.alive:
            self._free[info.bucket].pop(info.rank, None)
        info.load -= info.inflight.pop(task_id)
        info.nbytes -= info.sizes.pop(task_id, 0)
        info.stealing.discard(task_id)
        if not info.stealing:
            self._stealing.discard(info.rank)
        if len(info.inflight) <= info.slots:
            self._queued.discard(info.rank)
            if not info.inflight and info.alive:
                self._idle.add(info.rank)
        if info.alive:
            self._place(info)

    def _observe(self, duration: float, count: int = 1) -> None:
        """``count`` calls took ``duration`` seconds each (a bundle: its mean),
        weighed as that many results, so that bundles move the mean as fast
        as the tasks they stand for would have."""
        mean = self._mean_duration
        weight = DURATION_EWMA if count == 1 else 1.0 - (1.0 - DURATION_EWMA) ** count
        mean = duration if mean is None else mean + weight * (duration - mean)
        self._mean_duration = mean
        wanted = MAX_PREFETCH if mean <= 0 else math.ceil(PIPELINE_SECONDS / mean)
        wanted = max(1, min(MAX_PREFETCH, wanted))
        # hysteresis: re-bucket every rank only when the depth changes twofold
        if wanted >= 2 * self._prefetch or 2 * wanted <= self._prefetch:
            self._prefetch = wanted
            self._free = [{}]
            self._top = 0
            for info in self._ranks.values():
                self._set_capacity(info)
                if info.alive:
                    self._place(info)

    def _backoff(self, policy: TaskPolicy, failures: int) -> float:
        if policy.retry_backoff <= 0:
            return 0.0
        delay = min(policy.retry_backoff_max, policy.retry_backoff * 2 ** (failures - 1))
        return self._rng.uniform(0, delay) if policy.retry_jitter else delay
