"""What `FarmExecutor.statistics()` returns: frozen snapshots of the farm and
of each worker rank, taken by the service thread (`taskfarm._master`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class RankStatistics:
    """One worker rank's figures."""

    host: str
    slots: int
    tasks: int
    failed: int
    busy_time: float
    alive: bool
    #: CPU the rank spent outside tasks, per second of its life (from its Bye)
    overhead_cpu_fraction: float | None
    #: how the rank ran tasks: "solo", "threads" or "processes" (from its Bye)
    pool: str | None = None
    #: time inside tasks per slot-second of the rank's life: busy_time / (slots * life)
    busy_fraction: float | None = None
    #: the same for each slot (from its Bye)
    slot_busy_fraction: tuple[float, ...] | None = None
    #: child processes started again after a crash, a time limit or recycling
    child_restarts: int | None = None
    #: rings of the doorbell arrived both ways between rank 0 and this rank, so
    #: both sides slept between messages instead of polling (from its Bye; see
    #: `taskfarm._transport.Wakeup`); False means they polled every few ms
    doorbell: bool | None = None


@dataclasses.dataclass(frozen=True)
class FarmStatistics:
    """A snapshot of the farm: counts by outcome, per-rank figures, costs.

    Counts are over the farm's life (every executor that used it).
    """

    submitted: int
    done: int
    failed: int
    cancelled: int
    retried: int
    resubmitted: int
    stolen: int
    zombies: int
    duplicates: int
    pending: int
    running: int
    workers: int
    lost_ranks: tuple[int, ...]
    wall_time: float
    #: CPU of the master's rounds (its service thread's, and those user
    #: threads ran: ``submit_rounds``, ``result_rounds``) per second of wall time
    master_cpu_fraction: float
    prefetch: int
    mpi: str
    ranks: Mapping[int, RankStatistics]
    #: True when the farm stopped early (signal or deadline)
    drained: bool = False
    #: on resume: tasks reused from the journal, new, rerun, not resubmitted
    resume: Mapping[str, int] | None = None
    journal_bytes: int | None = None
    #: the workers' pool and task slots per worker rank (rank 0's own worker has one)
    pool: str = "solo"
    concurrency: int = 1
    #: True when rank 0 runs tasks too (it appears as rank 0 in ``ranks``)
    master_works: bool = False
    #: True when a lost rank leaves the job running (Open MPI with --with-ft ulfm)
    ulfm: bool = False
    #: copies started of straggling ``speculative`` tasks; the copy that lost
    #: the race counts in ``duplicates``
    speculated: int = 0
    #: tasks that went out in bundles with others (plain calls submitted faster
    #: than they run; see docs/performance.md, "Bundles"); counted in the above too
    bundled: int = 0
    #: rounds a user thread ran itself on an idle farm while the service
    #: thread slept: in ``submit``, sending the farm's one task (or one for
    #: an idle rank); in ``result``, taking what the rings it waited on
    #: announced (see `taskfarm._shortcuts`)
    submit_rounds: int = 0
    result_rounds: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``--stats-json`` writes)."""
        out = dataclasses.asdict(self)
        out["lost_ranks"] = list(self.lost_ranks)
        out["ranks"] = {str(r): dataclasses.asdict(s) for r, s in sorted(self.ranks.items())}
        return out
